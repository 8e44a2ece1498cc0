"""The `sr-tune` console script and the training loop behind `sr-tune train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sr_tune.checkpoint import load_checkpoint
from sr_tune.config import load_config
from sr_tune.engine import train
from sr_tune.models import list_models

from .conftest import REPO

SR_TUNE = Path(sys.executable).with_name("sr-tune")


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*args], capture_output=True, text=True, cwd=cwd, timeout=300, env=os.environ)


def test_models_lists_every_model_with_counts_at_each_scale():
    result = run(str(SR_TUNE), "models")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert sorted(rows) == list_models()
    assert rows["fsrcnn"][1:5] == ["1", "12,809", "12,809", "12,809"]  # 12,464 weights + biases + PReLU
    assert rows["edsr_baseline"][1:5] == ["3", "1,369,859", "1,554,499", "1,517,571"]
    assert rows["espcn"][2:5] == ["21,284", "22,729", "24,752"]  # the last layer grows with r^2


def test_python_dash_m_is_the_same_program():
    result = run(sys.executable, "-m", "sr_tune", "config", "configs/smoke.yaml", "optimizer.lr=5e-4")
    assert result.returncode == 0, result.stderr
    assert "lr: 0.0005" in result.stdout and "name: srcnn_915" in result.stdout


def test_config_reference_documents_every_key():
    result = run(str(SR_TUNE), "config", "--reference")
    assert result.returncode == 0
    for key in ("model.name", "data.lr_patch_size", "optimizer.grad_clip_norm", "tracking.tracking_uri"):
        assert key in result.stdout


def test_train_command_runs_through_ray_local_mode_and_mlflow(tmp_path: Path):
    result = run(
        str(SR_TUNE),
        "train",
        str(REPO / "configs" / "smoke.yaml"),
        "training.steps=30",
        "training.eval_interval=15",
        "tracking.run_name=cli",
        "data.val_crop=48",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "step     30/30" in result.stdout and "patches/s" in result.stdout and "ETA" in result.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "runs" / "cli" / "last")
    assert checkpoint.step == 30 and checkpoint.config.training.steps == 30
    assert checkpoint.metrics["val_psnr"] > 15 and (tmp_path / "runs" / "cli" / "best").is_dir()
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside the SQLite store


def test_a_run_that_fails_is_failed_in_mlflow_with_its_reason(tmp_path: Path):
    from mlflow import MlflowClient

    diverging = ["optimizer.name=sgd", "optimizer.lr=10", "optimizer.momentum=0.99", "training.steps=200"]
    result = run(
        str(SR_TUNE), "train", str(REPO / "configs" / "smoke.yaml"), *diverging, "training.device=cpu", cwd=tmp_path
    )
    assert result.returncode == 1 and "sr-tune: training diverged: step" in result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run_] = client.search_runs([client.get_experiment_by_name("sr_tune").experiment_id])
    assert run_.info.status == "FAILED" and "loss term pixel" in run_.data.tags["sr_tune.error"]


def test_bad_config_exits_2_listing_every_problem():
    result = run(str(SR_TUNE), "train", "configs/smoke.yaml", "optimizer.lr=0", "model.name=nope", "data.color=cmyk")
    assert result.returncode == 2
    assert "3 problem(s) in configs/smoke.yaml" in result.stderr
    for key in ("optimizer.lr", "model.name", "data.color"):
        assert key in result.stderr


def test_resume_without_a_checkpoint_is_refused_before_anything_starts(tmp_path: Path):
    result = run(str(SR_TUNE), "train", "configs/smoke.yaml", f"training.output_dir={tmp_path / 'runs'}", "--resume")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert f"--resume: no checkpoint to continue from at {tmp_path / 'runs' / 'srcnn_915_x3' / 'last'}" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_training_improves_and_is_deterministic_for_a_seed():
    config = load_config(
        REPO / "configs" / "smoke.yaml", ["training.steps=150", "training.eval_interval=50", "training.device=cpu"]
    )
    first = train(config)
    again = train(config)
    assert [r.loss for r in first.history] == [r.loss for r in again.history]
    assert [r.psnr for r in first.history] == [r.psnr for r in again.history]
    losses = [r.loss for r in first.history]
    assert losses[-1] < 0.5 * losses[0]
    assert first.final.psnr > first.history[0].psnr + 0.5
    # MATLAB-bicubic baseline, x3, sample val crops, 8-bit LR and output (29.256 in floating point)
    assert first.final.bicubic_psnr == pytest.approx(29.245, abs=0.001)


def test_other_seeds_draw_other_runs():
    config = load_config(REPO / "configs" / "smoke.yaml", ["training.steps=5", "training.eval_interval=5"])
    other = load_config(
        REPO / "configs" / "smoke.yaml", ["training.steps=5", "training.eval_interval=5", "training.seed=1"]
    )
    assert train(config).final.loss != train(other).final.loss
