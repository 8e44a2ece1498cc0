"""MLflow one way: a client for a URI resolved once, a tracker per run, and no process-wide state left
behind (a real SQLite store, no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from sr_tune.engine import EvalResult, TrainResult
from sr_tune.models import create_model
from sr_tune.tracking import NullTracker, log_model, open_tracker, resolve_tracking_uri, start_run


def result(step: int, psnr: float) -> EvalResult:
    return EvalResult(
        step=step,
        loss=0.01,
        losses={"pixel": 0.01},
        lr=1e-3,
        psnr=psnr,
        ssim=0.9,
        bicubic_psnr=29.0,
        bicubic_ssim=0.85,
        patches_per_second=100.0,
        seconds=1.0,
    )


def test_the_users_variable_wins_and_relative_sqlite_paths_become_absolute(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri("sqlite:///mlflow.db") == "http://127.0.0.1:5000"


def test_a_run_is_logged_through_its_client_and_leaves_mlflows_global_store_alone(tmp_path: Path, monkeypatch):
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)  # the user's shell points at another store
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    run_id = start_run(client, "sr_tune", name="run", tags={"command": "test"}, params={"model.scale": 2})
    assert isinstance(open_tracker(store, run_id, rank=1, in_channels=1), NullTracker)
    assert isinstance(open_tracker(None, run_id, rank=0, in_channels=1), NullTracker)
    tracker = open_tracker(store, run_id, rank=0, in_channels=1)
    history = [result(10, 29.5), result(20, 29.8)]
    for evaluation in history:
        tracker.log_eval(evaluation, {"patches_seen": evaluation.step * 16})
    model = create_model("srcnn_915", scale=2)
    tracker.finish(TrainResult(history=history, last_checkpoint=None, best_checkpoint=None), model)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.scale"] == "2"
    assert [m.value for m in client.get_metric_history(run_id, "val_psnr")] == [29.5, 29.8]
    assert client.get_metric_history(run_id, "patches_seen")[-1].step == 20
    assert run.data.tags["best_val_psnr"] == "29.8000"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"curves.png"}
    # The model logging call put MLflow's process-wide store and the variable back as the user had them.
    assert mlflow.get_tracking_uri() == elsewhere
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    lr = torch.rand(1, 1, 48, 48)  # the export example's size
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        reloaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    torch.testing.assert_close(reloaded(lr), model(lr), atol=1e-5, rtol=0)


def test_a_registered_model_gets_a_version(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = start_run(client, "sr_tune", name="parent", tags={}, params={})
    version = log_model(
        client,
        run_id,
        create_model("fsrcnn", scale=2),
        in_channels=1,
        name="best_model",
        registered_name="sr_tune-test",
    )
    assert version == "1" and client.get_model_version("sr_tune-test", "1").run_id == run_id


PREPARE_THEN_LOG = """
import os, sys, tempfile
from pathlib import Path
from mlflow import MlflowClient
from mlflow.utils import requirements_utils
from sr_tune.models import create_model
from sr_tune.tracking import log_model, prepare_model_logging, start_run
assert "torch._dynamo" not in sys.modules and not requirements_utils._PACKAGES_TO_MODULES
before = set(Path(tempfile.gettempdir()).glob("sr_tune-export-*"))
prepare_model_logging(1)
# What the first export of a process pays for is paid: the compiler stack imported, the packages mapped.
assert "torch._dynamo" in sys.modules and requirements_utils._PACKAGES_TO_MODULES
assert set(Path(tempfile.gettempdir()).glob("sr_tune-export-*")) == before  # its folder is gone
assert "MLFLOW_TRACKING_URI" not in os.environ
client = MlflowClient(sys.argv[1])
run_id = start_run(client, "sr_tune", name="parent", tags={}, params={})
print(log_model(client, run_id, create_model("espcn", scale=2), in_channels=1, registered_name="prepared"))
"""


TRIAL_PROCESS_LOGS = """
import sys
import torch
import sr_tune.sweep  # what a sweep's trial process imports
from sr_tune.engine import EvalResult, Preview
from sr_tune.tracking import open_tracker, start_run
from mlflow import MlflowClient
run_id = start_run(MlflowClient(sys.argv[1]), "sr_tune", name="trial", tags={}, params={})
tracker = open_tracker(sys.argv[1], run_id, 0, 1)
image = torch.rand(3, 16, 16)
preview = Preview(lr=image, bicubic=image, sr=image, hr=image, bicubic_psnr=20.0, sr_psnr=21.0)
tracker.log_eval(EvalResult(step=1, loss=0.1, losses={}, lr=1e-3, vgg={}, patches_per_second=1.0, seconds=1.0,
                            psnr=21.0, ssim=0.5, bicubic_psnr=20.0, bicubic_ssim=0.4, preview=preview))
tracker.flush()
assert MlflowClient(sys.argv[1]).list_artifacts(run_id, "grids"), "no preview grid logged"
print(sorted(name for name in sys.modules if name.split(".")[0] == "matplotlib"))
"""


def test_a_trial_process_logs_its_evaluations_and_grids_without_importing_matplotlib(tmp_path: Path):
    # matplotlib is half a second of a trial process's start on a busy core; only the sweep's driver draws.
    done = subprocess.run(
        [sys.executable, "-c", TRIAL_PROCESS_LOGS, f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_preparing_the_export_pays_its_first_call_costs_and_leaves_nothing_behind(tmp_path: Path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(  # a fresh process: this one has imported torch._dynamo through its optimizers
        [sys.executable, "-c", PREPARE_THEN_LOG, store], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "1"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        reloaded = mlflow.pytorch.load_model("models:/prepared/1")
    assert reloaded(torch.rand(1, 1, 48, 48)).shape == (1, 1, 96, 96)  # the export example's size
