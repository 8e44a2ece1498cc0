"""Real sweeps on a local Ray: TPE + ASHA, PBT, and a killed sweep resumed; then the MLflow store is read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import ray
import torch

from sr_tune.checkpoint import load_checkpoint
from sr_tune.distributed import init_ray
from sr_tune.cli import main
from sr_tune.study import load_study
from sr_tune.sweep import TrialSummary, edge_warnings, max_concurrent_trials, run_sweep
from sr_tune.tracking import TRIAL_TAG

from .conftest import mlflow_runs, write_sweep_study as write_study

# One Ray at a time on the machine: Ray 2.60's PlacementGroupCleaner finds its cluster by auto-detection,
# which fails when two local Ray instances run, and stopped trials then never free their workers' CPUs.
pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("ray")]


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_concurrency_follows_the_cluster_and_bad_resources_are_named(tmp_path: Path, local_ray):
    one_cpu = load_study(write_study(tmp_path, "name: c\nsearch: {optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}"))
    assert max_concurrent_trials(one_cpu) == 2  # 2 CPUs, 1 worker x 1 CPU per trial
    two_workers = replace(one_cpu, resources=replace(one_cpu.resources, workers=2))
    assert max_concurrent_trials(two_workers) == 1
    capped = replace(one_cpu, budget=replace(one_cpu.budget, max_concurrent=1))
    assert max_concurrent_trials(capped) == 1
    with pytest.raises(ValueError, match="needs 1 worker"):
        max_concurrent_trials(replace(one_cpu, resources=replace(one_cpu.resources, cpus_per_worker=3.0)))


def test_a_best_value_near_the_edge_of_its_range_is_warned_about(tmp_path: Path):
    study = load_study(write_study(tmp_path, """
name: edges
search:
  optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  data.augment_strength: {type: uniform, low: 0.0, high: 1.0}
  data.batch_size: {type: choice, values: [8, 16]}
"""))
    best = TrialSummary(trial_id="t", params={"optimizer.lr": 9.5e-3, "data.augment_strength": 0.5, "data.batch_size": 8},
                        best={}, patches_seen=0, stopped_early=False, error=None, run_id=None, best_checkpoint=None)  # fmt: skip
    warnings = edge_warnings(study, best)
    assert len(warnings) == 1 and warnings[0].startswith("optimizer.lr = 0.0095") and "high edge" in warnings[0]


def test_a_bad_study_stops_the_tune_command_naming_the_file_and_key(tmp_path: Path, capsys):
    path = write_study(tmp_path, "name: bad\nsearch: {optimizer.lrr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}")
    assert main(["tune", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "optimizer.lrr: unknown key" in error


def test_tpe_asha_sweep_logs_a_parent_and_a_nested_run_per_trial_and_registers_the_best(tmp_path: Path, local_ray):
    study = load_study(write_study(tmp_path, """
name: asha
search:
  optimizer.lr: {type: loguniform, low: 1.0e-5, high: 3.0e-2}
  optimizer.weight_decay: {type: loguniform, low: 1.0e-8, high: 1.0e-3}
sampler: {name: tpe, seed: 0, startup_trials: 3}
scheduler: {name: asha, grace_period: 20, reduction_factor: 2}
budget: {num_samples: 6, max_steps: 80}
"""))
    result = run_sweep(study)

    trials = {t.trial_id: t for t in result.trials}
    assert len(trials) == 6 and all(t.error is None for t in trials.values())
    budget = study.patches(80)
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
    assert len(children) == len(runs) - 1 == 6
    assert {c.data.tags[TRIAL_TAG] for c in children} == set(trials)
    for child in children:
        trial = trials[child.data.tags[TRIAL_TAG]]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert child.data.tags["sr_tune.stopped_early"] == str(trial.stopped_early).lower()
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_psnr")]
        last_step = trial.patches_seen // 8
        assert steps == list(range(20, last_step + 1, 20))
        assert len(client.list_artifacts(child.info.run_id, "grids")) == len(steps)
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"curves.png", "best_checkpoint", "grids"}

    best = result.trials[0]
    assert float(parent.data.params["best.optimizer.lr"]) == pytest.approx(best.params["optimizer.lr"])
    assert parent.data.metrics["best_val_psnr"] == pytest.approx(max(values))
    assert parent.data.tags["git_sha"] and "sr_tune.study" in parent.data.tags
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "plots", "search_space"} <= artifacts
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path)))
    assert len(table) == 6 and table["best_val_psnr"].iloc[0] == pytest.approx(max(values))
    text = Path(client.download_artifacts(parent.info.run_id, "search_space/study.yaml", str(tmp_path))).read_text()
    assert text == study.text
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/best_so_far.png", "plots/param_optimizer.lr.png", "plots/param_optimizer.weight_decay.png"}
    versions = client.search_model_versions("name='sr_tune-asha'")
    assert [v.run_id for v in versions] == [parent.info.run_id]
    registered = mlflow.pytorch.load_model("models:/sr_tune-asha/1")
    lr = torch.rand(1, 1, 48, 48)
    expected = load_checkpoint(best.best_checkpoint).build_model()(lr)
    assert torch.allclose(registered(lr), expected, atol=1e-5)

    # The Optuna study sits beside the MLflow store, one trial per Tune trial.
    stored = optuna.load_study(study_name="asha", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(stored.trials) == 6


def test_pbt_copies_the_better_trials_weights_and_perturbs_hyperparameters(tmp_path: Path, local_ray):
    study = load_study(write_study(tmp_path, """
name: pbt
search:
  optimizer.lr: {type: loguniform, low: 1.0e-5, high: 3.0e-2}
  data.augment_strength: {type: uniform, low: 0.0, high: 0.5}
sampler: {name: random, seed: 3}
scheduler: {name: pbt, perturbation_interval: 40, quantile_fraction: 0.5, resample_probability: 0.0, synch: true}
budget: {num_samples: 2, max_steps: 100}
"""))
    result = run_sweep(study)
    assert len(result.trials) == 2 and all(t.error is None for t in result.trials)

    reports = {}
    for trial in result.trials:
        frame = pd.read_csv(result.experiment / f"trial_{trial.trial_id}" / "progress.csv")
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
    final = load_checkpoint(_latest_checkpoint(result.experiment / f"trial_{target}"))
    donor_psnr = dict(zip(reports[donor]["step"], reports[donor]["val_psnr"]))
    own_first = dict(zip(frame["step"], frame["val_psnr"]))
    inherited = [e for e in final.state["history"] if donor_psnr.get(e["step"]) == pytest.approx(e["psnr"], abs=1e-9)]
    assert inherited, "the exploiting trial's state did not come from the donor"
    assert any(own_first.get(e["step"]) != pytest.approx(e["psnr"], abs=1e-9) for e in inherited)

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 3  # restarts continue the trial's nested run
    plots = {a.path for a in client.list_artifacts(result.parent_run_id, "plots")}
    assert "plots/pbt_schedule_optimizer.lr.png" in plots
    child = next(r for r in runs if r.data.tags.get(TRIAL_TAG) == target)
    schedule = {m.value for m in client.get_metric_history(child.info.run_id, "hp/optimizer.lr")}
    assert len(schedule) > 1


def _latest_checkpoint(trial_dir: Path) -> Path:
    return max(trial_dir.glob("checkpoint_*"))
