"""MLflow one way: a client for a URI resolved once, a tracker per run, and no process-wide state left
behind (a real SQLite store, no Ray)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from PIL import Image

from sr_tune.checkpoint import save_checkpoint
from sr_tune.config import ModelConfig, TrainConfig
from sr_tune.data.sources import skimage_photo
from sr_tune.engine import TrainResult
from sr_tune.inference import png_bytes
from sr_tune.models import create_model
from sr_tune.results import EvalResult
from sr_tune.served_model import image_request, upscaled_pngs
from sr_tune.tracking import NullTracker, follow_moved_store, log_model, open_tracker, resolve_tracking_uri, start_run


def checkpoint_folder(path: Path, name: str = "fsrcnn") -> Path:
    config = TrainConfig(model=ModelConfig(name=name, scale=2))
    return save_checkpoint(path, model=create_model(name, scale=2), config=config, step=1)


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
    assert isinstance(open_tracker(store, run_id, rank=1), NullTracker)
    assert isinstance(open_tracker(None, run_id, rank=0), NullTracker)
    tracker = open_tracker(store, run_id, rank=0)
    history = [result(10, 29.5), result(20, 29.8)]
    for evaluation in history:
        tracker.log_eval(evaluation, {"patches_seen": evaluation.step * 16})
    best = checkpoint_folder(tmp_path / "best", "srcnn_915")
    tracker.finish(TrainResult(history=history, last_checkpoint=None, best_checkpoint=best))

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.scale"] == "2"
    assert [m.value for m in client.get_metric_history(run_id, "val_psnr")] == [29.5, 29.8]
    assert client.get_metric_history(run_id, "patches_seen")[-1].step == 20
    assert run.data.tags["best_val_psnr"] == "29.8000"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"curves.png"}
    # The model logging call put MLflow's process-wide store and the variable back as the user had them.
    assert mlflow.get_tracking_uri() == elsewhere
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        reloaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    photo = png_bytes(skimage_photo("coffee")[:, :21, :30].contiguous())
    (upscaled,) = upscaled_pngs(reloaded.predict(image_request([photo])))
    assert Image.open(io.BytesIO(upscaled)).size == (60, 42)


def test_a_registered_model_gets_a_version(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = start_run(client, "sr_tune", name="parent", tags={}, params={})
    version = log_model(client, run_id, checkpoint_folder(tmp_path / "best"), registered_name="sr_tune-test")
    assert version == "1" and client.get_model_version("sr_tune-test", "1").run_id == run_id


def _store_with_a_registered_model(folder: Path) -> tuple[str, str]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run_id = start_run(client, "sr_tune", name="first", tags={}, params={})
    client.log_text(run_id, "kept", "notes/first.txt")
    log_model(client, run_id, checkpoint_folder(folder / "checkpoint", "espcn"), registered_name="moved")
    return run_id, client.get_run(run_id).info.artifact_uri


@pytest.mark.parametrize("folder_name", ["project", "my project"])  # a space: percent-encoded in URIs
def test_a_copied_or_moved_store_keeps_its_artifacts_beside_it(tmp_path: Path, folder_name: str):
    first, second = tmp_path / folder_name, tmp_path / "elsewhere" / folder_name
    first.mkdir()
    run_id, artifact_uri = _store_with_a_registered_model(first)
    assert Path(first / "mlruns" / run_id).is_dir()
    shutil.copytree(first, second)
    uri = f"sqlite:///{second / 'mlflow.db'}"
    assert follow_moved_store(uri, "sr_tune") == (
        f"{second / 'mlflow.db'} was made in {first}: its artifact paths now point to {second / 'mlruns'}"
    )
    assert follow_moved_store(uri, "sr_tune") is None  # done once
    shutil.rmtree(first)  # the old folder gone: everything is read from, and written to, the new one
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.artifact_uri == artifact_uri.replace(first.as_uri(), second.as_uri())
    download = Path(client.download_artifacts(run_id, "notes/first.txt", str(tmp_path)))
    assert download.read_text() == "kept"
    loaded = mlflow.pyfunc.load_model(client.get_model_version_download_uri("moved", "1"))
    assert loaded.metadata.metadata["sr_tune_model"] == "espcn"
    later = start_run(client, "sr_tune", name="second", tags={}, params={})
    client.log_text(later, "new", "notes/second.txt")
    assert (second / "mlruns" / later / "artifacts" / "notes" / "second.txt").read_text() == "new"
    assert not first.exists()


def test_a_store_copied_without_its_artifacts_is_left_as_it_is_and_says_where_they_go(tmp_path: Path):
    first, second = tmp_path / "project", tmp_path / "copy"
    first.mkdir()
    second.mkdir()
    run_id, artifact_uri = _store_with_a_registered_model(first)
    shutil.copy2(first / "mlflow.db", second / "mlflow.db")
    before = (second / "mlflow.db").read_bytes()
    note = follow_moved_store(f"sqlite:///{second / 'mlflow.db'}", "sr_tune")
    assert note is not None and note.startswith("note:") and f"Copy that folder to {second / 'mlruns'}" in note
    assert (second / "mlflow.db").read_bytes() == before
    assert follow_moved_store(f"sqlite:///{first / 'mlflow.db'}", "sr_tune") is None  # the original: at home


TRIAL_PROCESS_LOGS = """
import sys
import torch
import sr_tune.sweep.trial  # what a sweep's trial process imports
from sr_tune.results import EvalResult, Preview
from sr_tune.tracking import open_tracker, start_run
from mlflow import MlflowClient
run_id = start_run(MlflowClient(sys.argv[1]), "sr_tune", name="trial", tags={}, params={})
tracker = open_tracker(sys.argv[1], run_id, 0)
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
