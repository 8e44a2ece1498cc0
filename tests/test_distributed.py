"""Training through Ray Train (2 CPU workers over gloo vs 1 worker at double batch) and what reaches MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from sr_tune.checkpoint import load_checkpoint
from sr_tune.config import load_config
from sr_tune.distributed import fit, init_ray

from .conftest import REPO

pytestmark = pytest.mark.xdist_group("ray")  # one Ray at a time: see tests/test_sweep.py


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def config(tmp_path: Path, *overrides: str):
    return load_config(REPO / "configs" / "smoke.yaml", [
        "training.steps=60", "training.eval_interval=30", "training.device=cpu", "data.val_crop=48",
        f"training.output_dir={tmp_path / 'runs'}", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "distributed.cpus_per_worker=1", *overrides,
    ])  # fmt: skip


def test_two_gloo_workers_match_one_worker_at_double_batch_and_log_to_mlflow(tmp_path: Path, local_ray):
    two = fit(config(tmp_path, "distributed.num_workers=2", "data.batch_size=16", "tracking.run_name=two"))
    one = fit(config(tmp_path, "distributed.num_workers=1", "data.batch_size=32", "tracking.run_name=one"))

    # Same effective batch, same seed: the loss curves agree (different patches, so not bit for bit).
    assert two.metrics["step"] == one.metrics["step"] == 60
    assert two.metrics["loss"] == pytest.approx(one.metrics["loss"], rel=0.25)
    assert two.metrics["val_psnr"] == pytest.approx(one.metrics["val_psnr"], abs=1.0)

    # Checkpoints arrived through Ray into its storage, kept best-first by val_psnr.
    persisted = load_checkpoint(two.checkpoint)
    assert persisted.step == 60 and str(tmp_path / "runs" / "ray" / "two") in two.checkpoint
    assert len(two.best_checkpoints) == 2 and persisted.metrics["val_psnr"] == two.metrics["val_psnr"]

    # MLflow (SQLite store): params, per-step metrics, the image grids and the logged model.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(two.run_id)
    assert run.info.run_name == "two" and run.info.status == "FINISHED"
    assert run.data.params["data.batch_size"] == "16" and run.data.params["distributed.num_workers"] == "2"
    assert run.data.params["model.name"] == "srcnn_915" and "command" in run.data.tags
    history = client.get_metric_history(two.run_id, "val_psnr")
    assert [m.step for m in history] == [30, 60] and history[-1].value == pytest.approx(two.metrics["val_psnr"])
    grids = [a.path for a in client.list_artifacts(two.run_id, "grids")]
    assert grids == ["grids/step_0000030.png", "grids/step_0000060.png"]
    grid = mlflow.artifacts.load_image(f"runs:/{two.run_id}/grids/step_0000060.png")
    assert grid.size == (4 * 48, 48 + 14)  # LR | bicubic | SR | HR, with a caption strip
    assert {a.path for a in client.list_artifacts(two.run_id)} >= {"curves.png", "best_checkpoint", "grids"}

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{two.run_id}/model")
    lr = torch.rand(1, 1, 48, 48)
    expected = load_checkpoint(tmp_path / "runs" / "two" / "best").build_model()(lr)
    np.testing.assert_allclose(model(lr).detach().numpy(), expected.detach().numpy(), atol=1e-5)
