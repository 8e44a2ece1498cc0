"""What a newcomer runs in the first hour, as the README shows it: resuming a finished run, a config with two
problems at once, the debug switch, a home-relative data folder, the files the README's commands create."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from .conftest import REPO

SHORT = ["training.steps=20", "training.eval_interval=10", "data.val_crop=48", "training.device=cpu"]


def sr_tune(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "SR_TUNE_"))}
    return subprocess.run(
        [sys.executable, "-m", "sr_tune", *args],
        cwd=cwd,
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_resuming_a_finished_run_shows_its_result_and_logs_nothing_again(tmp_path: Path):
    config = str(REPO / "configs" / "smoke.yaml")
    first = sr_tune("train", config, *SHORT, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sr_tune").experiment_id])
    models = len(client.search_logged_models([run.info.experiment_id]))
    artifacts = sorted(path.relative_to(tmp_path) for path in (tmp_path / "mlruns").rglob("*"))
    for _ in range(2):
        again = sr_tune("train", config, *SHORT, "--resume", cwd=tmp_path)
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
        assert "run srcnn_915_x3 is finished (step 20 of 20)" in again.stdout
        assert f"PSNR-Y {run.data.metrics['val_psnr']:.2f} dB" in again.stdout and run.info.run_id in again.stdout
    assert len(client.search_logged_models([run.info.experiment_id])) == models
    assert sorted(path.relative_to(tmp_path) for path in (tmp_path / "mlruns").rglob("*")) == artifacts
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    # More steps asked for: the run goes on from its last checkpoint.
    longer = sr_tune("train", config, *SHORT[1:], "training.steps=30", "--resume", cwd=tmp_path)
    assert longer.returncode == 0 and "done: PSNR-Y" in longer.stdout, longer.stderr[-3000:]


def test_a_config_problem_and_a_missing_data_folder_come_in_one_round_with_the_debug_switch_keeping_the_code(
    tmp_path: Path,
):
    args = ("train", str(REPO / "configs" / "smoke.yaml"), "model.kwargs.foo=1", "data.train=nope")
    refused = sr_tune(*args, cwd=tmp_path)
    assert refused.returncode == 2 and "2 problem(s)" in refused.stderr
    assert "model.kwargs.foo" in refused.stderr and "data.train: 'nope' does not exist" in refused.stderr
    debug = sr_tune(*args, cwd=tmp_path, SR_TUNE_DEBUG="1")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "2 problem(s)" in debug.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_home_relative_data_folder_is_the_home_folder(tmp_path: Path):
    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    shown = sr_tune("config", str(REPO / "configs" / "smoke.yaml"), "data.train=~/photos", cwd=tmp_path, HOME=str(home))
    assert shown.returncode == 0 and f"train: {home / 'photos'}" in shown.stdout
    missing = sr_tune("train", str(REPO / "configs" / "smoke.yaml"), "data.train=~/none", cwd=tmp_path, HOME=str(home))
    assert missing.returncode == 2 and f"resolved to {home / 'none'}" in missing.stderr


def test_the_folders_the_readmes_commands_create_are_ignored_by_git():
    ignored = (REPO / ".gitignore").read_text().split()
    assert {"wheels/", "upscaled/", "runs/", "mlflow.db", "mlruns/", "optuna.db"} <= set(ignored)
    readme = (REPO / "README.md").read_text()
    assert "seven sections" in readme and "pip install optuna-dashboard" in readme


def test_a_study_too_large_for_this_machine_is_refused_with_the_override_that_fits(tmp_path: Path):
    refused = sr_tune("tune", str(REPO / "search_spaces" / "srcnn_optimizer.yaml"), cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    cpus = os.cpu_count() or 1
    if cpus < 4:  # the study asks for 4 CPUs a trial
        assert f"this machine has {cpus}: run it with the override resources=local" in refused.stderr
    gpu_study = sr_tune("tune", str(REPO / "search_spaces" / "vdsr.yaml"), "budget.num_samples=2", cwd=tmp_path)
    if not torch.cuda.is_available():
        assert gpu_study.returncode == 2 and "run it on the CPU with the override resources=local" in gpu_study.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no Ray, no MLflow store, no state file


@pytest.mark.parametrize("study", sorted(path.name for path in (REPO / "search_spaces").glob("*.yaml")))
def test_every_shipped_study_fits_this_machine_with_the_one_override_resources_local(study: str):
    from sr_tune.preflight import resource_problems
    from sr_tune.study import load_study

    shipped = load_study(REPO / "search_spaces" / study)
    fitted = load_study(REPO / "search_spaces" / study, ["resources=local"])
    assert resource_problems(fitted) == []
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    assert fitted.resources.workers == min(shipped.resources.workers, cpus) and fitted.resources.cpus_per_worker == 1
    on_gpus = shipped.resources.gpus_per_worker and fitted.resources.workers <= gpus
    assert fitted.resources.gpus_per_worker == (shipped.resources.gpus_per_worker if on_gpus else 0)
    trial = fitted.trial_config({})
    if shipped.resources.gpus_per_worker and not on_gpus:
        assert trial.training.device == "cpu" and not trial.distributed.use_gpu
    else:
        assert trial.training.device == shipped.trial_config({}).training.device
    later = load_study(REPO / "search_spaces" / study, ["resources=local", "resources.cpus_per_worker=2"])
    assert later.resources.cpus_per_worker == 2  # a later override wins


def test_tune_takes_overrides_of_the_study_and_of_every_trials_config():
    from sr_tune.fields import ConfigError
    from sr_tune.study import load_study

    path = REPO / "search_spaces" / "srcnn_optimizer.yaml"
    study = load_study(
        path, ["resources.cpus_per_worker=1", "budget.num_samples=2", "training.device=cpu", "keep_checkpoints=1"]
    )
    assert (study.resources.cpus_per_worker, study.budget.num_samples, study.keep_checkpoints) == (1.0, 2, 1)
    assert study.fixed["training.device"] == "cpu" and study.trial_config({}).training.device == "cpu"
    unchanged = load_study(path)
    assert unchanged.resources.cpus_per_worker == 4.0 and "training.device" not in unchanged.fixed
    try:
        load_study(path, ["budget.num_samples=0", "optimizer.lr=1", "nonsense=1", "data.batch_size=-3"])
    except ConfigError as error:
        problems = error.problems
    assert len(problems) == 4 and all("(from the override" in p or p.startswith("override") for p in problems)
    assert any("optimizer.lr is searched by the study" in p for p in problems)


def test_overrides_may_follow_the_flags():
    from sr_tune.cli import parse_command

    args = parse_command(["tune", "s.yaml", "budget.max_steps=9", "--resume", "budget.num_samples=2"])
    assert args.resume and args.overrides == ["budget.max_steps=9", "budget.num_samples=2"]
    assert parse_command(["train", "c.yaml", "--resume", "training.steps=5"]).overrides == ["training.steps=5"]
    with pytest.raises(SystemExit) as refused:
        parse_command(["tune", "s.yaml", "--resume", "--bogus"])
    assert refused.value.code == 2


def test_a_reader_that_goes_away_ends_a_command_quietly():
    """``sr-tune models | head -1``: no error line when the pipe closes early."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sr_tune", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()  # the reader is gone before the first line is written
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 141 and errors == b""
