"""The model people use: the registered pyfunc upscales image files of any size exactly as `sr-tune upscale`
does, a real `mlflow models serve` answers it over HTTP, `upscale`/`eval`/`export` take a registry URI, and
every family exports to ONNX with dynamic sizes (a real SQLite store, real photographs, no Ray)."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from sr_tune.checkpoint import load_checkpoint, save_checkpoint
from sr_tune.cli import main
from sr_tune.config import DataConfig, ModelConfig, TrainConfig
from sr_tune.data.sources import skimage_photo
from sr_tune.models import create_model, list_models
from sr_tune.served_model import image_request, upscaled_pngs
from sr_tune.tracking import log_model, register_best, start_run

from .services import free_port, start, wait_until

# Odd sizes, so that no tile, shuffle or border lines up by chance; a JPEG and a grey image too.
PHOTOS = {
    "coffee.png": skimage_photo("coffee")[:, 100:137, 200:253],
    "chelsea.jpg": skimage_photo("chelsea")[:, 50:111, 80:109],
}


def checkpoint(folder: Path, name: str, scale: int, color: str) -> Path:
    torch.manual_seed(0)
    config = TrainConfig(model=ModelConfig(name=name, scale=scale), data=DataConfig(color=color))
    model = create_model(name, scale=scale, in_channels=config.in_channels)
    with torch.no_grad():  # a model that is not the identity: every output pixel depends on the weights
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return save_checkpoint(folder, model=model, config=config, step=7)


def photo_files(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for name, pixels in PHOTOS.items():
        path = folder / name
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    grey = folder / "grey.png"
    Image.fromarray(PHOTOS["coffee.png"][0].numpy(), mode="L").save(grey)
    return [*paths, grey]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two registered models in one store: a Y model (luma through the network) and an RGB one."""
    folder = tmp_path_factory.mktemp("registry")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(store)
    checkpoints = {
        "sr_y": checkpoint(folder / "y", "fsrcnn", 3, "y"),
        "sr_rgb": checkpoint(folder / "rgb", "espcn", 2, "rgb"),
    }
    for name, path in checkpoints.items():
        run_id = start_run(client, "sr_tune", name=name, tags={}, params={})
        version = log_model(client, run_id, path, registered_name=name)
        register_best(client, name, version, description="test", tags={"study": "test"})
    return {"store": store, "checkpoints": checkpoints, "photos": photo_files(folder / "photos"), "folder": folder}


def sr_tune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return subprocess.run(
        [sys.executable, "-m", "sr_tune.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("name", ["sr_y", "sr_rgb"])
def test_the_registered_model_answers_the_bytes_upscale_writes_for_any_photo(registry, name: str, tmp_path: Path):
    photos, store = registry["photos"], registry["store"]
    by_checkpoint, by_model = tmp_path / "checkpoint", tmp_path / "model"
    inputs = [str(path) for path in photos]
    assert (
        main(["upscale", *inputs, "--checkpoint", str(registry["checkpoints"][name]), "--out", str(by_checkpoint)]) == 0
    )
    uri = f"models:/{name}@best"
    assert main(["upscale", *inputs, "--model", uri, "--tracking-uri", store, "--out", str(by_model)]) == 0
    with pytest.MonkeyPatch.context() as patch:  # MLflow reads the process's store for models:/ URIs
        patch.setenv("MLFLOW_TRACKING_URI", store)
        model = mlflow.pyfunc.load_model(uri)
        example = model.metadata.load_input_example(mlflow.artifacts.download_artifacts(uri))
    answers = upscaled_pngs(model.predict(image_request([path.read_bytes() for path in photos])))
    for path, answer in zip(photos, answers):
        written = (by_checkpoint / f"{path.stem}_x{model.metadata.metadata['scale']}.png").read_bytes()
        assert answer == written == (by_model / f"{path.stem}_x{model.metadata.metadata['scale']}.png").read_bytes()
    # What the registry page shows: image dimensions that vary, a real photograph as the example.
    inputs_schema = model.metadata.get_input_schema().to_dict()
    assert inputs_schema == [{"type": "string", "name": "image", "required": True}]
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(example["image"][0]))))
    assert pixels.ndim == 3 and pixels.std() > 10  # a photograph, not noise or a blank


def test_a_real_mlflow_models_serve_answers_an_image_with_the_upscaled_png(registry, tmp_path: Path):
    port = free_port()
    bin_folder = str(Path(sys.executable).parent)  # mlflow starts uvicorn from the PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["store"], "PATH": f"{bin_folder}:{os.environ['PATH']}"}
    command = ["mlflow", "models", "serve", "-m", "models:/sr_y@best"]
    server = start(
        "mlflow models serve",
        [*command, "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        tmp_path / "serve.log",
        env,
    )
    try:
        wait_until(lambda: _get(f"http://127.0.0.1:{port}/ping") == 200, server, timeout_s=120)
        photo = registry["photos"][0]
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(photo.read_bytes()).decode()]]}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
    finally:
        server.stop()
    upscale = tmp_path / "upscaled"
    assert (
        main(["upscale", str(photo), "--checkpoint", str(registry["checkpoints"]["sr_y"]), "--out", str(upscale)]) == 0
    )
    assert base64.b64decode(answer["predictions"][0]["image"]) == (upscale / f"{photo.stem}_x3.png").read_bytes()


def _get(url: str) -> int:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status


def test_eval_reads_a_registered_model_as_it_reads_its_checkpoint(registry, tmp_path: Path):
    folder, store = registry["photos"][0].parent, registry["store"]
    by_checkpoint = sr_tune(
        "eval", "--checkpoint", str(registry["checkpoints"]["sr_y"]), "--data", str(folder), cwd=tmp_path
    )
    by_model = sr_tune(
        "eval", "--model", "models:/sr_y/1", "--tracking-uri", store, "--data", str(folder), cwd=tmp_path
    )
    assert by_checkpoint.returncode == by_model.returncode == 0, by_model.stderr
    assert by_model.stdout == by_checkpoint.stdout and "fsrcnn x3 (y), step 7" in by_model.stdout


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("models:/nothing_here@best", "Registered Model with name=nothing_here not found"),
        ("models:/sr_y@worst", "alias worst not found"),
        ("models:/sr_y/9", "sr_y"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "0123456789abcdef0123456789abcdef"),
    ],
)
def test_an_unknown_model_name_alias_or_run_is_one_line_and_exit_2(registry, tmp_path: Path, uri: str, says: str):
    photo = str(registry["photos"][0])
    done = sr_tune("upscale", photo, "--model", uri, "--tracking-uri", registry["store"], "--out", "out", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"sr-tune: {uri}: not found in the MLflow store") and says in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_model_uri_without_a_store_is_refused_and_no_store_is_made(tmp_path: Path):
    done = sr_tune("eval", "--model", "models:/sr_y@best", "--data", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and f"no MLflow store at {tmp_path / 'mlflow.db'}" in done.stderr, done.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("name", list_models())
def test_every_family_exports_to_onnx_with_dynamic_sizes_that_match_torch(name: str, tmp_path: Path):
    import onnxruntime

    scale = 2 if name == "waifu2x_vgg7" else 3
    folder = checkpoint(tmp_path / "checkpoint", name, scale, "y")
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(folder), "--format", "onnx", str(out)]) == 0
    model = load_checkpoint(folder).build_model()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    upscaled = hasattr(model, "after_bicubic")
    assert metadata["scale"] == str(scale) and ("already upscaled" in metadata["input"]) == upscaled
    for height, width in ((37, 53), (20, 11)):  # odd sizes, and one unlike the first
        lr = torch.rand(2, 1, height, width)
        with torch.no_grad():
            expected = (
                model.after_bicubic(torch.nn.functional.interpolate(lr, scale_factor=scale)) if upscaled else model(lr)
            )
        graph_input = torch.nn.functional.interpolate(lr, scale_factor=scale) if upscaled else lr
        (answer,) = session.run(None, {session.get_inputs()[0].name: graph_input.numpy()})
        assert answer.shape == (2, 1, height * scale, width * scale)
        np.testing.assert_allclose(answer, expected.numpy(), atol=1e-4, rtol=0)


def test_export_never_replaces_a_users_file_and_says_why(tmp_path: Path, capsys):
    folder = checkpoint(tmp_path / "checkpoint", "espcn", 2, "y")
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"the user's own file")
    assert main(["export", "--checkpoint", str(folder), str(mine)]) == 2
    assert mine.read_bytes() == b"the user's own file" and "exists: pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(folder), str(mine), "--overwrite"]) == 0
    assert mine.read_bytes()[:2] != b"th" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "mine.onnx"]
