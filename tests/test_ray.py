"""Everything that starts a local Ray in this process; with test_cluster.py it runs on one xdist worker, so
that one Ray instance runs at a time (conftest.RAY_FILES): Ray 2.60's PlacementGroupCleaner finds its cluster
by auto-detection, which fails when two local Ray instances run on the machine, and then trials stopped early
never free their workers' CPUs.

Ray Train alone (2 gloo workers vs 1), then the sweeps. A sweep killed mid-flight and resumed is in
test_cluster.py, on a two-node cluster with its storage in S3.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from sr_tune.checkpoint import load_checkpoint
from sr_tune.config import load_config
from sr_tune.console import format_value
from sr_tune.data.sources import skimage_photo
from sr_tune.distributed import fit, init_ray
from sr_tune.inference import Upscaler, png_bytes
from sr_tune.served_model import image_request, upscaled_pngs
from sr_tune.study import load_study
from sr_tune.sweep.driver import run_sweep
from sr_tune.sweep.layout import remove_sweep, sweep_paths
from sr_tune.sweep.search import max_concurrent_trials
from sr_tune.tracking import TRIAL_TAG, experiment_id

from .conftest import ASSETS, REPO, mlflow_runs
from .conftest import write_sweep_study as write_study
from .listeners import ListenerWatch, processes_named
from .test_pinned import curve

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
DDP_PINNED = ASSETS / "ddp_pinned.json"  # the 2-worker run's curve


@pytest.fixture(scope="module")
def local_ray():
    """This module's local Ray, and a watch of the sockets its processes listen on while the tests run."""
    watch = ListenerWatch().start()
    init_ray(num_cpus=2)
    yield watch
    ray.shutdown()
    watch.stop()


def config(tmp_path: Path, *overrides: str):
    return load_config(
        REPO / "configs" / "smoke.yaml",
        [
            "training.steps=90",
            "training.eval_interval=30",
            "training.device=cpu",
            "data.val_crop=48",
            f"training.output_dir={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "distributed.cpus_per_worker=1",
            *overrides,
        ],
    )


def kill_the_train_worker_after(client: MlflowClient, run_name: str, evaluations: int) -> tuple[threading.Thread, list]:
    """A thread that SIGKILLs a Ray Train worker once the run named ``run_name`` (a SQL LIKE pattern) has logged
    ``evaluations``."""
    killed: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            time.sleep(0.25)
            if (experiment := client.get_experiment_by_name("sr_tune")) is None:
                continue  # the sweep has not opened its store yet
            runs = client.search_runs([experiment.experiment_id], f"attributes.run_name LIKE '{run_name}'")
            logged = [m for run in runs for m in client.get_metric_history(run.info.run_id, "val_psnr")]
            if len(logged) >= evaluations and (workers := processes_named("ray::RayTrainWo")):
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, killed


def test_two_gloo_workers_match_one_killed_and_restarted_worker_at_double_batch_and_log_to_mlflow(
    tmp_path: Path, local_ray, monkeypatch
):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    two = fit(
        config(tmp_path, "distributed.num_workers=2", "data.batch_size=16", "tracking.run_name=two"), client=client
    )
    # The one worker is SIGKILLed after its first evaluation: Ray Train (max_failures) starts a new one from the
    # checkpoint it persisted there, which goes on exactly as the killed one would have.
    killer, killed = kill_the_train_worker_after(client, "one", evaluations=1)
    one = fit(
        config(
            tmp_path,
            "distributed.num_workers=1",
            "distributed.max_failures=1",
            "data.batch_size=32",
            "tracking.run_name=one",
        ),
        client=client,
    )
    killer.join()
    assert killed, "the worker was never killed"
    assert client.get_run(one.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(one.run_id, "val_psnr")] == [30, 60, 90]  # each once

    # Two gloo workers, seeded: the same curve on every run (patches seeded per rank, a fixed all-reduce order).
    ddp_curve = curve(list(load_checkpoint(two.checkpoint).run.history))
    if os.environ.get("SR_TUNE_REPIN"):  # re-pin: SR_TUNE_REPIN=1 pytest tests/test_ray.py -k two_gloo
        DDP_PINNED.write_text(json.dumps({"torch": torch.__version__, "curve": ddp_curve}, indent=2) + "\n")
    pinned = json.loads(DDP_PINNED.read_text())["curve"]
    assert [point["step"] for point in ddp_curve] == [point["step"] for point in pinned] == [30, 60, 90]
    for point, expected in zip(ddp_curve, pinned):
        assert point == pytest.approx(expected, rel=1e-4), f"step {point['step']}"

    # Same effective batch, same seed: the loss curves agree (different patches, so not bit for bit).
    assert two.metrics["step"] == one.metrics["step"] == 90
    assert two.metrics["loss"] == pytest.approx(one.metrics["loss"], rel=0.25)
    assert two.metrics["val_psnr"] == pytest.approx(one.metrics["val_psnr"], abs=1.0)

    # Checkpoints arrived through Ray into its storage, kept best-first by val_psnr.
    persisted = load_checkpoint(two.checkpoint)
    assert persisted.step == 90 and str(tmp_path / "runs" / "ray" / "two") in two.checkpoint
    assert len(two.best_checkpoints) == 2 and persisted.metrics["val_psnr"] == two.metrics["val_psnr"]

    # MLflow (SQLite store): params, per-step metrics, the image grids and the logged model.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(two.run_id)
    assert run.info.run_name == "two" and run.info.status == "FINISHED"
    assert run.data.params["data.batch_size"] == "16" and run.data.params["distributed.num_workers"] == "2"
    assert run.data.params["model.name"] == "srcnn_915" and "command" in run.data.tags
    history = client.get_metric_history(two.run_id, "val_psnr")
    assert [m.step for m in history] == [30, 60, 90] and history[-1].value == pytest.approx(two.metrics["val_psnr"])
    grids = [a.path for a in client.list_artifacts(two.run_id, "grids")]
    assert grids == ["grids/step_0000030.png", "grids/step_0000060.png", "grids/step_0000090.png"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # this test's own fluent reads
    grid = np.asarray(mlflow.artifacts.load_image(f"runs:/{two.run_id}/grids/step_0000090.png"))
    # LR | bicubic | SR | HR, the 48 px crops enlarged 4x, under a caption strip; in colour though the model is Y.
    assert grid.shape == (192 + 24, 4 * 192 + 6, 3)
    assert np.abs(grid[24:, :, 0].astype(int) - grid[24:, :, 2]).mean() > 5
    assert len(client.get_metric_history(two.run_id, "bicubic_psnr")) == 1  # the same at every evaluation
    assert {a.path for a in client.list_artifacts(two.run_id)} >= {"curves.png", "best_checkpoint", "grids"}

    # The logged model upscales a photo as `sr-tune upscale` does with the run's best checkpoint.
    photo = skimage_photo("chelsea")[:, :23, :31].contiguous()
    answer = mlflow.pyfunc.load_model(f"runs:/{two.run_id}/model").predict(image_request([png_bytes(photo)]))
    best = load_checkpoint(tmp_path / "runs" / "two" / "best")
    upscaler = Upscaler(best.build_model(), scale=best.config.model.scale, color=best.config.data.color)
    assert upscaled_pngs(answer) == [png_bytes(upscaler.rgb(photo))]


def test_concurrency_follows_the_cluster_and_bad_resources_are_named(tmp_path: Path, local_ray):
    one_cpu = load_study(
        write_study(tmp_path, "name: c\nsearch: {optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}")
    )
    assert max_concurrent_trials(one_cpu) == 2  # 2 CPUs, 1 worker x 1 CPU per trial
    two_workers = replace(one_cpu, resources=replace(one_cpu.resources, workers=2))
    assert max_concurrent_trials(two_workers) == 1
    capped = replace(one_cpu, budget=replace(one_cpu.budget, max_concurrent=1))
    assert max_concurrent_trials(capped) == 1
    with pytest.raises(ValueError, match=r"asks for 1 worker\(s\) x 3 CPU\(s\).*resources.cpus_per_worker=2"):
        max_concurrent_trials(replace(one_cpu, resources=replace(one_cpu.resources, cpus_per_worker=3.0)))


def test_tpe_asha_sweep_logs_a_parent_and_a_nested_run_per_trial_and_registers_the_best(tmp_path: Path, local_ray):
    study = load_study(
        write_study(
            tmp_path,
            """
name: asha
search:
  optimizer.lr: {type: loguniform, low: 1.0e-5, high: 3.0e-2}
  optimizer.weight_decay: {type: loguniform, low: 1.0e-8, high: 1.0e-3}
sampler: {name: tpe, seed: 0, startup_trials: 3}
scheduler: {name: asha, grace_period: 20, reduction_factor: 2}
budget: {num_samples: 4, max_steps: 60}
""",
        )
    )
    result = run_sweep(study, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    trials = {t.trial_id: t for t in result.trials}
    assert len(trials) == 4 and all(t.error is None for t in trials.values())
    assert sorted(t.name for t in trials.values()) == ["t01", "t02", "t03", "t04"]
    budget = study.patches(60)
    assert any(t.stopped_early for t in trials.values()), "ASHA stopped no trial"
    assert any(t.patches_seen == budget for t in trials.values())
    values = [t.best["val_psnr"] for t in result.trials]
    assert values == sorted(values, reverse=True)
    for trial in trials.values():  # Tune holds each trial's checkpoints (copied into its own folder)
        assert trial.best_checkpoint and str(result.experiment) in trial.best_checkpoint
        assert load_checkpoint(trial.best_checkpoint).metrics["val_psnr"] == pytest.approx(trial.best["val_psnr"])

    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(children) == len(runs) - 1 == 4
    assert {c.data.tags[TRIAL_TAG] for c in children} == set(trials)
    for child in children:
        trial = trials[child.data.tags[TRIAL_TAG]]
        assert child.info.status == "FINISHED"
        lr, wd = trial.params["optimizer.lr"], trial.params["optimizer.weight_decay"]
        assert child.info.run_name == f"{trial.name} lr={format_value(lr)} wd={format_value(wd)}"
        assert float(child.data.params["optimizer.lr"]) == pytest.approx(lr, rel=1e-4)  # 5 digits, the exponent
        assert child.data.tags["sr_tune.stopped_early"] == str(trial.stopped_early).lower()
        history = client.get_metric_history(child.info.run_id, "val_psnr")
        last_step = trial.patches_seen // 8
        assert [m.step for m in history] == list(range(20, last_step + 1, 20))
        # Ended when Tune stopped or finished the trial: seconds after its last evaluation, not at the sweep's end.
        assert 0 <= child.info.end_time - history[-1].timestamp < 20_000
        assert child.data.metrics["best_val_psnr"] == pytest.approx(max(m.value for m in history))
        assert [key for key in child.data.metrics if key.startswith("best_")] == ["best_val_psnr"]  # one summary
        assert f"Best val_psnr **{max(m.value for m in history):.4f}**" in child.data.tags["mlflow.note.content"]
        assert len(client.get_metric_history(child.info.run_id, "bicubic_psnr")) == 1
        assert not [key for key in child.data.metrics if key.startswith("hp/")]  # params already; only PBT varies them
        assert len(client.list_artifacts(child.info.run_id, "grids")) == len(history)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"curves.png", "best_checkpoint", "grids"}

    # The trials the sweep ended with took over the slots of ended ones: the last one ran on both CPUs.
    granted = {c.data.tags[TRIAL_TAG]: client.get_metric_history(c.info.run_id, "cpu_threads") for c in children}
    last = max(children, key=lambda c: c.info.end_time).data.tags[TRIAL_TAG]
    assert [point.value for point in granted[last]] == [2]
    assert not list((tmp_path / "runs" / "sweeps" / "asha.runs").glob("*.threads"))  # removed after the sweep

    best = result.trials[0]
    best_run = next(c for c in children if c.data.tags[TRIAL_TAG] == best.trial_id)
    assert [c.info.run_id for c in children if c.data.tags.get("sr_tune.best") == "true"] == [best_run.info.run_id]
    assert parent.data.tags["sr_tune.best_run_id"] == best_run.info.run_id
    assert parent.data.tags["sr_tune.best_trial"] == best.name
    # Best values under the trials' own keys: one runs-table column each.
    assert float(parent.data.params["optimizer.lr"]) == pytest.approx(best.params["optimizer.lr"], rel=1e-4)
    assert parent.data.metrics["best_val_psnr"] == pytest.approx(max(values)) == best_run.data.metrics["best_val_psnr"]
    assert parent.data.metrics["val_psnr"] == pytest.approx(max(values))  # where the runs table's column looks
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("## Sweep `asha`")
    assert f"(#/experiments/{parent.info.experiment_id}/runs/{best_run.info.run_id})" in description
    assert parent.data.tags["git_sha"] and "sr_tune.study" in parent.data.tags
    assert "### What mattered for `val_psnr`" in description and "| `optimizer.lr` |" in description
    assert result.importance is not None and set(result.importance.shares) == set(study.search)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "importance.csv", "plots", "search_space"} <= artifacts
    # The experiment opens as model training, described, with this sweep's trials as a shared runs-table view.
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"].startswith("Super-resolution runs of sr_tune.")
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.sweep-{parent.info.run_id}"])
    assert view["searchFilter"] == f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    assert view["selectedColumns"][:2] == ["metrics.`best_val_psnr`", "metrics.`val_psnr`"]
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path)))
    assert len(table) == 4 and table["best_val_psnr"].iloc[0] == pytest.approx(max(values))
    text = Path(client.download_artifacts(parent.info.run_id, "search_space/study.yaml", str(tmp_path))).read_text()
    assert text == study.text
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {
        "plots/best_so_far.png",
        "plots/importance.png",
        "plots/param_optimizer.lr.png",
        "plots/param_optimizer.weight_decay.png",
    }
    # The best model is logged on the best trial's own run and registered from there.
    best_run_id = parent.data.tags["sr_tune.best_run_id"]
    versions = client.search_model_versions("name='sr_tune-asha'")
    assert [v.run_id for v in versions] == [best_run_id] and best_run_id != parent.info.run_id
    version = client.get_model_version_by_alias("sr_tune-asha", "best")
    assert str(version.version) == "1" and f"Best trial {best.name} of sweep asha" in version.description
    assert version.tags == {
        "study": "asha",
        "trial": best.name,
        "trial_id": best.trial_id,
        "model": "srcnn_915",
        "scale": "3",
        "color": "y",
        "val_psnr": f"{max(values):.4f}",
    }
    with pytest.MonkeyPatch.context() as patch:  # this test's own fluent read of the registry, undone after it
        patch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
        registered = mlflow.pyfunc.load_model("models:/sr_tune-asha@best")
    photo = skimage_photo("coffee")[:, 7:36, 11:52].contiguous()
    checkpoint = load_checkpoint(best.best_checkpoint)
    upscaler = Upscaler(checkpoint.build_model(), scale=3, color="y")
    assert upscaled_pngs(registered.predict(image_request([png_bytes(photo)]))) == [png_bytes(upscaler.rgb(photo))]

    # The Optuna study sits in the sweep's own folder, one trial per Tune trial.
    stored = optuna.load_study(study_name="asha", storage=f"sqlite:///{tmp_path / 'runs/sweeps/asha/optuna.db'}")
    assert len(stored.trials) == 4


def test_a_final_run_trains_the_best_values_longer_on_both_cpus_and_its_model_is_registered(tmp_path: Path, local_ray):
    study = load_study(
        write_study(
            tmp_path,
            """
name: final
search:
  optimizer.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-3}
  data.batch_size: {type: choice, values: [4, 8]}
sampler: {name: random, seed: 1}
scheduler: {name: none}
budget: {num_samples: 2, max_steps: 30, final_steps: 60}
""",
        )
    )
    result = run_sweep(study, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    winner, final = result.trials[0], result.final
    assert final is not None and final.params == winner.params and final.error is None
    assert final.patches_seen == study.patches(60)  # the final budget at the base batch size, all of it
    checkpoint = load_checkpoint(final.best_checkpoint)
    # Two one-CPU workers sharing the winner's batch: the same patches per step, so the same recipe, longer.
    batch = study.trial_config(winner.params).data.batch_size
    assert checkpoint.config.distributed.num_workers == 2 and checkpoint.config.data.batch_size == batch // 2
    assert checkpoint.config.training.steps == 60 * 8 // batch
    assert checkpoint.config.optimizer.lr == winner.params["optimizer.lr"]
    assert final.best["val_psnr"] == pytest.approx(checkpoint.metrics["val_psnr"])

    client, runs = mlflow_runs(tmp_path)
    parent = next(r for r in runs if r.info.run_id == result.parent_run_id)
    children = {r.data.tags[TRIAL_TAG]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {t.trial_id for t in result.trials} | {"final"}
    final_run = children["final"]
    assert final_run.info.status == "FINISHED" and final_run.data.tags["sr_tune.final_of"] == winner.name
    assert final_run.data.params["training.steps"] == str(60 * 8 // batch)
    history = client.get_metric_history(final_run.info.run_id, "val_psnr")
    assert [m.step for m in history] == [40 * 8 // batch, 60 * 8 // batch]  # as often as a trial, in 2x its length
    assert final_run.data.metrics["best_val_psnr"] == pytest.approx(max(m.value for m in history))
    assert parent.data.tags["sr_tune.final_run_id"] == final_run.info.run_id
    assert parent.data.metrics["final_val_psnr"] == pytest.approx(final.best["val_psnr"])
    assert parent.data.tags["sr_tune.best_trial"] == winner.name  # the search's best stays the search's
    # The registered model is the final run's when it scored better than the winning trial, else the trial's.
    version = client.get_model_version_by_alias("sr_tune-final", "best")
    won = final.best["val_psnr"] > winner.best["val_psnr"]
    assert result.final_registered == won
    registered = final_run if won else children[winner.trial_id]
    assert version.run_id == registered.info.run_id and version.tags["trial_id"] == (
        "final" if won else winner.trial_id
    )
    if won:
        assert version.description.startswith("The final run (the best trial's values trained longer) of sweep final")
        assert f"at step {checkpoint.step}" in version.description


def test_trials_of_two_workers_go_through_the_train_bridge_and_survive_a_killed_worker(tmp_path: Path, local_ray):
    """The path of every study with GPUs or ``workers: 2``: each trial a Ray Train run over 2 gloo workers whose
    reports and checkpoints its driver relays to Tune. ASHA stops the weak trial through the report gate, a
    worker SIGKILLed mid-trial is restarted from its checkpoint, and each trial's MLflow history has every
    evaluation once."""
    study = load_study(
        write_study(
            tmp_path,
            """
name: bridge
search:
  optimizer.lr: {type: choice, values: [3.0e-3, 1.0e-7]}
sampler: {name: grid, seed: 1}
scheduler: {name: asha, grace_period: 20, reduction_factor: 2}
budget: {num_samples: 1, max_steps: 60}
resources: {workers: 2, cpus_per_worker: 1}
keep_checkpoints: 1
""",
            fixed="  distributed.max_failures: 1\n",
        )
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id(client, "sr_tune")  # the store made here, not by two threads at once
    killer, killed = kill_the_train_worker_after(client, "t01 %", evaluations=1)
    result = run_sweep(study, tracking_uri=client.tracking_uri)
    killer.join()
    assert killed, "no worker was killed"

    trials = {t.name: t for t in result.trials}
    assert sorted(trials) == ["t01", "t02"] and all(t.error is None for t in trials.values())
    good, weak = sorted(trials.values(), key=lambda t: t.params["optimizer.lr"], reverse=True)
    budget = study.patches(60)  # 60 steps x batch 8 x 2 workers
    assert budget == 960 and good.patches_seen == budget and not good.stopped_early
    # The weak trial started second (grid order, seed 1), met the good one's value at the first rung, and was
    # stopped there: its workers found the gate closed and trained no further.
    assert weak.stopped_early and weak.patches_seen == study.patches(20)
    _, runs = mlflow_runs(tmp_path)
    children = {r.data.tags[TRIAL_TAG]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    for trial in trials.values():
        run = children[trial.trial_id]
        assert run.info.status == "FINISHED"
        history = [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")]
        assert history == list(range(20, trial.patches_seen // 16 + 1, 20))  # each evaluation once, none lost
        assert load_checkpoint(trial.best_checkpoint).metrics["val_psnr"] == pytest.approx(trial.best["val_psnr"])
        assert str(result.experiment) in trial.best_checkpoint  # Tune's copy of the checkpoint Train reported
    assert client.get_run(result.parent_run_id).info.status == "FINISHED" and result.model_version == "1"


def test_a_restarted_sweep_starts_its_searcher_over_and_leaves_nothing_of_the_earlier_one(tmp_path: Path, local_ray):
    study = load_study(
        write_study(
            tmp_path,
            """
name: again
search: {optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}
sampler: {name: tpe, seed: 3, startup_trials: 1}
scheduler: {name: none}
budget: {num_samples: 2, max_steps: 20}
""",
        )
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_sweep(study, tracking_uri=uri)
    paths = sweep_paths(study, uri)
    with pytest.raises(FileExistsError, match="--restart to remove it and start over"):
        run_sweep(study, tracking_uri=uri)
    removed = remove_sweep(study, paths)
    assert paths.storage.path_of("again") in removed and paths.state in removed
    assert sorted(p.name for p in (tmp_path / "runs" / "sweeps").iterdir()) == []  # nothing stale
    second = run_sweep(study, tracking_uri=uri)

    def sampled(result):
        return sorted(round(t.params["optimizer.lr"], 12) for t in result.trials)

    assert sampled(second) == sampled(first)  # the same seeds draw the same values: a fresh searcher
    with pytest.raises(ValueError, match=r"started with the overrides \(none\); --resume continues it with the same"):
        run_sweep(replace(study, overrides=("budget.num_samples=3",)), tracking_uri=uri, resume=True)
    stored = optuna.load_study(study_name="again", storage=paths.optuna_url)
    assert len(stored.trials) == 2  # this sweep's trials only
    client, runs = mlflow_runs(tmp_path)
    parents = {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert parents == {first.parent_run_id, second.parent_run_id}  # the earlier sweep's runs stay


def test_pbt_copies_the_better_trials_weights_and_perturbs_hyperparameters(tmp_path: Path, local_ray):
    study = load_study(
        write_study(
            tmp_path,
            """
name: pbt
search:
  optimizer.lr: {type: loguniform, low: 1.0e-5, high: 3.0e-2}
  data.augment_strength: {type: uniform, low: 0.0, high: 0.5}
sampler: {name: random, seed: 3}
scheduler: {name: pbt, perturbation_interval: 40, quantile_fraction: 0.5, resample_probability: 0.0, synch: true}
budget: {num_samples: 2, max_steps: 60}  # one exploit, at step 40
""",
        )
    )
    result = run_sweep(study, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(result.trials) == 2 and all(t.error is None for t in result.trials)

    reports = {}
    for trial in result.trials:
        frame = pd.read_csv(Path(result.experiment) / f"trial_{trial.trial_id}" / "progress.csv")
        reports[trial.trial_id] = frame
    perturbed = [tid for tid, frame in reports.items() if frame["hp/optimizer.lr"].nunique() > 1]
    assert perturbed, "PBT changed no hyperparameter"
    target = perturbed[0]
    donor = next(tid for tid in reports if tid != target)
    frame = reports[target]
    before, after = frame["hp/optimizer.lr"].iloc[0], frame["hp/optimizer.lr"].iloc[-1]
    donor_lrs = set(reports[donor]["hp/optimizer.lr"])
    # Explore multiplies the donor's value by 0.8 or 1.2 (resampling is off in this study).
    assert any(after == pytest.approx(lr * f) for lr in donor_lrs for f in (0.8, 1.2)) and after != before

    # Exploit copied the donor's weights: the target's final checkpoint carries the donor's history, with
    # evaluations the donor reported and the target (training on its own) did not.
    final = load_checkpoint(_latest_checkpoint(Path(result.experiment) / f"trial_{target}"))
    donor_psnr = dict(zip(reports[donor]["step"], reports[donor]["val_psnr"]))
    own_first = dict(zip(frame["step"], frame["val_psnr"]))
    inherited = [e for e in final.run.history if donor_psnr.get(e.step) == pytest.approx(e.psnr, abs=1e-9)]
    assert inherited, "the exploiting trial's state did not come from the donor"
    assert any(own_first.get(e.step) != pytest.approx(e.psnr, abs=1e-9) for e in inherited)

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 3  # restarts continue the trial's nested run
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert "plots/pbt_schedule_optimizer.lr.png" in plots
    child = next(r for r in runs if r.data.tags.get(TRIAL_TAG) == target)
    schedule = {m.value for m in client.get_metric_history(child.info.run_id, "hp/optimizer.lr")}
    assert len(schedule) > 1


def _latest_checkpoint(trial_dir: Path) -> Path:
    return max(trial_dir.glob("checkpoint_*"))


def test_local_ray_listened_on_loopback_only_and_kept_token_auth(local_ray: ListenerWatch):
    """Runs last: the watch saw every process of the Train runs and sweeps above (GCS, raylet, dashboard and
    its agents, Train controllers and gloo workers, Tune trial actors)."""
    seen = set(local_ray.seen)
    processes = {listener.process for listener in seen}
    assert {"gcs_server", "raylet"} <= processes and sum(name.startswith("ray::") for name in processes) >= 3
    assert sorted(listener for listener in seen if not listener.loopback) == []
    dashboard = ray.get_runtime_context().gcs_address  # the node's own address, where clients find it
    assert dashboard.startswith("127.0.0.1:")
    with pytest.raises(urllib.error.HTTPError) as refused:  # the dashboard's API without the session's token
        urllib.request.urlopen("http://127.0.0.1:8265/api/version", timeout=10)
    assert refused.value.code == 401


def test_delta_stn_trials_on_two_ddp_workers_log_their_schedules_and_register_a_plain_model(tmp_path: Path, local_ray):
    """Delta-STN as the inner loop of a sweep, each trial a Ray Train run over 2 gloo workers: the ranks
    average every phase's gradients, MLflow gets each hyperparameter's trajectory beside the loss, and the
    registered model is the plain network."""
    study = load_study(
        write_study(
            tmp_path,
            """
name: stn
search:
  optimizer.lr: {type: choice, values: [3.0e-3]}
sampler: {name: grid, seed: 0}
scheduler: {name: none}
budget: {num_samples: 1, max_steps: 40}
resources: {workers: 2, cpus_per_worker: 1}
keep_checkpoints: 1
""",
            fixed="""  delta_stn.enabled: true
  delta_stn.l2: [1.0e-4, 1.0e-8, 1.0e-1]
  delta_stn.pixel_mix: {l1: [0.5, 0.01, 10.0]}
  delta_stn.warmup_steps: 4
  delta_stn.interval: 2
  delta_stn.hyper_lr: 0.05
""",
        )
    )
    result = run_sweep(study, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (trial,) = result.trials
    assert trial.error is None and trial.patches_seen == study.patches(40)
    client, runs = mlflow_runs(tmp_path)
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    curves = {name: client.get_metric_history(child.info.run_id, f"hp_{name}") for name in ("l2", "mix_l1")}
    for history in curves.values():
        assert [m.step for m in history] == [20, 40]
    assert curves["mix_l1"][-1].value != pytest.approx(0.5, rel=1e-3)  # 18 hyperparameter steps moved it
    assert child.data.metrics["hp_l2_scale"] > 0
    best = load_checkpoint(trial.best_checkpoint)
    assert set(best.group("model")) == set(best.build_model().state_dict())  # the plain keys; the rest beside them
    assert result.model_version == "1"
