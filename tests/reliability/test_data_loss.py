"""Nothing a user has is lost: every command that writes is pointed at folders and files the user already
has (their own files, an earlier run's checkpoints, a data set made before, two photos with one name), and
the bytes of everything there are compared before and after. No Ray is started: each refusal comes first."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr_tune.checkpoint import load_checkpoint, save_checkpoint
from sr_tune.config import load_config
from sr_tune.data.sources import sample_images, skimage_photo, write_shards
from sr_tune.models import create_model

from ..conftest import REPO

SR_TUNE = [sys.executable, "-m", "sr_tune"]


def hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (hidden ones too), by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def sr_tune(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "SR_TUNE_"))}
    return subprocess.run(
        [*SR_TUNE, *args], cwd=cwd, env={**environment, **env}, capture_output=True, text=True, timeout=300
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr


def user_files(folder: Path) -> Path:
    """A folder of a user's own things: a photo, notes, a hidden file, a subfolder."""
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(skimage_photo("coffee")[:, :32, :32].permute(1, 2, 0).numpy()).save(folder / "photo.png")
    (folder / "notes.txt").write_text("my notes")
    (folder / ".hidden").write_bytes(os.urandom(64))
    (folder / "sub" / "data.bin").write_bytes(os.urandom(256))
    return folder


def small_checkpoint(path: Path, seed: int = 1, **overrides: str) -> Path:
    config = load_config(None, ["model.name=fsrcnn_s", "model.scale=2", *(f"{k}={v}" for k, v in overrides.items())])
    torch.manual_seed(seed)
    model = create_model("fsrcnn_s", scale=2, in_channels=config.in_channels)
    return save_checkpoint(path, model=model, config=config, step=seed)


# --- 1. a checkpoint never replaces what is not a checkpoint ------------------------------------------------


def test_a_checkpoint_written_onto_a_users_folder_is_refused_and_the_folder_is_untouched(tmp_path: Path):
    folder = user_files(tmp_path / "mine")
    before = hashes(folder)
    with pytest.raises(FileExistsError, match="not an sr_tune checkpoint"):
        small_checkpoint(folder)
    assert hashes(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]

    # Beside the user's files when asked: the two files are added, nothing of theirs changes.
    config = load_config(None, ["model.name=fsrcnn_s", "model.scale=2"])
    model = create_model("fsrcnn_s", scale=2, in_channels=1)
    save_checkpoint(folder, model=model, config=config, step=3, keep_other_files=True)
    after = hashes(folder)
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) == {"weights.safetensors", "checkpoint.json"}
    assert load_checkpoint(folder).step == 3

    # A checkpoint folder is replaced as before, whole; a planted ".x.old" of the user's is never removed.
    ckpt = small_checkpoint(tmp_path / "ckpt", seed=1)
    small_checkpoint(ckpt, seed=2)
    assert load_checkpoint(ckpt).step == 2
    user_files(tmp_path / ".ckpt.old")
    planted = hashes(tmp_path / ".ckpt.old")
    with pytest.raises(FileExistsError, match="is in the way"):
        small_checkpoint(ckpt, seed=3)
    assert hashes(tmp_path / ".ckpt.old") == planted and load_checkpoint(ckpt).step == 2


def test_import_weights_onto_a_users_folder_exits_2_and_keeps_every_byte(tmp_path: Path, waifu2x_wheel: Path):
    folder = user_files(tmp_path / "mine")
    before = hashes(folder)
    message = refused(sr_tune("import-weights", "waifu2x-vgg7", str(waifu2x_wheel), str(folder), cwd=tmp_path))
    assert "holds files of yours" in message and "--overwrite" in message
    assert hashes(folder) == before

    done = sr_tune("import-weights", "waifu2x-vgg7", str(waifu2x_wheel), str(folder), "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {k: v for k, v in hashes(folder).items() if k in before} == before
    assert load_checkpoint(folder).config.model.name == "waifu2x_vgg7"

    # An existing checkpoint (e.g. an earlier import or a training run's best) is not replaced silently either.
    ckpt = small_checkpoint(tmp_path / "best")
    earlier = hashes(ckpt)
    assert "already holds a checkpoint" in refused(
        sr_tune("import-weights", "waifu2x-vgg7", str(waifu2x_wheel), str(ckpt), cwd=tmp_path)
    )
    assert hashes(ckpt) == earlier
    (tmp_path / "empty").mkdir()  # an empty folder is as good as a new one
    done = sr_tune("import-weights", "waifu2x-vgg7", str(waifu2x_wheel), str(tmp_path / "empty"), cwd=tmp_path)
    assert done.returncode == 0 and load_checkpoint(tmp_path / "empty").step == 0, done.stderr


# --- 2. a fresh run never touches an earlier run's files --------------------------------------------------


def test_a_second_train_under_the_same_name_is_refused_before_anything_starts(tmp_path: Path):
    runs = tmp_path / "runs"
    options = [f"training.output_dir={runs}", "training.device=cpu"]
    small_checkpoint(runs / "srcnn_915_x3" / "last", seed=1)
    small_checkpoint(runs / "srcnn_915_x3" / "best", seed=2)
    before = hashes(runs)
    message = refused(
        sr_tune(
            "train",
            str(REPO / "configs" / "smoke.yaml"),
            *options,
            "data.val=missing",
            "training.init_from=nope",
            cwd=tmp_path,
        )
    )  # with the run's other problems, in one round
    assert "run 'srcnn_915_x3' exists" in message and "--resume" in message and "tracking.run_name=" in message
    assert "3 problem(s)" in message and "data.val: 'missing'" in message and "training.init_from:" in message
    assert hashes(runs) == before and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no mlflow.db

    # Through Ray Train workers: an earlier Ray Train run of the name would be resumed silently; refused too.
    ray_run = tmp_path / "ray" / "vdsr_x3"
    ray_run.mkdir(parents=True)
    (ray_run / "checkpoint_manager_snapshot.json").write_text("{}")
    message = refused(
        sr_tune(
            "train",
            str(REPO / "configs" / "smoke.yaml"),
            "model.name=vdsr",
            "distributed.num_workers=2",
            f"distributed.storage_path={tmp_path / 'ray'}",
            *options,
            cwd=tmp_path,
        )
    )
    assert f"{ray_run}" in message and hashes(runs) == before


def test_upscale_never_overwrites_an_output_and_two_inputs_of_one_name_are_refused(tmp_path: Path):
    checkpoint = small_checkpoint(tmp_path / "ckpt")
    photo = skimage_photo("astronaut")[:, :40, :48].permute(1, 2, 0).numpy()
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(photo).save(tmp_path / folder / "img.png")
    out = tmp_path / "out"
    message = refused(
        sr_tune("upscale", "a/img.png", "b/img.png", "--checkpoint", str(checkpoint), "--out", "out", cwd=tmp_path)
    )
    assert "would both be written to out/img_x2.png" in message and not out.exists()

    out.mkdir()
    (out / "img_x2.png").write_bytes(b"the user's own file")
    message = refused(sr_tune("upscale", "a/img.png", "--checkpoint", str(checkpoint), "--out", "out", cwd=tmp_path))
    assert "out/img_x2.png exists: pass --overwrite" in message
    assert (out / "img_x2.png").read_bytes() == b"the user's own file"
    done = sr_tune("upscale", "a/img.png", "--checkpoint", str(checkpoint), "--out", "out", "--overwrite", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert Image.open(out / "img_x2.png").size == (96, 80)


# --- 3. a failed prepare leaves the data set that was there -----------------------------------------------


def test_prepare_into_a_destination_holding_a_data_set_is_refused_and_the_data_set_still_reads(tmp_path: Path):
    dest = tmp_path / "shards"
    write_shards(sample_images("val"), str(dest), shard_bytes=1 << 20)
    before = hashes(dest)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage_photo("coffee").permute(1, 2, 0).numpy()).save(photos / "good.png")
    message = refused(sr_tune("prepare", str(photos), str(dest), cwd=tmp_path))
    assert "is not empty" in message and hashes(dest) == before
    manifest = json.loads((dest / "manifest.json").read_text())
    assert all((dest / shard["file"]).is_file() for shard in manifest["shards"])

    # A bad image is found before the first shard is written, also into a new destination.
    (photos / "truncated.png").write_bytes((photos / "good.png").read_bytes()[:2000])
    message = refused(sr_tune("prepare", str(photos), str(tmp_path / "new"), cwd=tmp_path))
    assert "truncated.png" in message and not (tmp_path / "new").exists()


# --- 13/14. every input and option checked before anything is written or created ----------------------------


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_upscale_refuses_bad_tiles_bombs_16_bit_images_and_huge_outputs_before_writing_anything(tmp_path: Path):
    checkpoint = small_checkpoint(tmp_path / "ckpt")
    good = _png(tmp_path / "good.png", skimage_photo("coffee")[:, :40, :40].permute(1, 2, 0).numpy())
    for tile in ("0", "-1", "x"):
        result = sr_tune(
            "upscale", str(good), "--checkpoint", str(checkpoint), "--out", "out", "--tile", tile, cwd=tmp_path
        )
        assert result.returncode == 2 and "--tile" in result.stderr and "Traceback" not in result.stderr
    # A PNG that declares 12,000 x 12,000 pixels (144 MP) in a few KB: Pillow only warns below 179 MP.
    bomb = Image.new("L", (12_000, 12_000))
    bomb.save(tmp_path / "bomb.png", optimize=True)
    assert (tmp_path / "bomb.png").stat().st_size < 200_000
    sixteen = _png(tmp_path / "deep.png", (np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 20))
    message = refused(
        sr_tune(
            "upscale",
            str(good),
            "bomb.png",
            str(sixteen),
            "--checkpoint",
            str(checkpoint),
            "--out",
            "out",
            cwd=tmp_path,
        )
    )
    assert "bomb.png: 12000x12000 is 144 megapixels" in message and "deep.png: I;16 images are not supported" in message
    assert not (tmp_path / "out").exists()

    big = _png(tmp_path / "big.png", np.zeros((800, 1000, 3), np.uint8))
    message = refused(
        sr_tune(
            "upscale", str(big), "--checkpoint", str(checkpoint), "--out", "out", "--max-output-mp", "2", cwd=tmp_path
        )
    )
    assert "2000x1600, 3 megapixels, over the 2 allowed" in message and not (tmp_path / "out").exists()


def test_train_refuses_bad_images_before_the_mlflow_store_or_a_run_folder_exists(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "good.png", skimage_photo("coffee").permute(1, 2, 0).numpy())
    (images / "truncated.png").write_bytes((images / "good.png").read_bytes()[:3000])
    Image.new("L", (12_000, 12_000)).save(images / "bomb.png")
    for suffix in ("jpg", "bmp", "webp"):  # each format's own truncation
        Image.open(images / "good.png").save(images / f"whole.{suffix}")
        data = (images / f"whole.{suffix}").read_bytes()
        (images / f"cut.{suffix}").write_bytes(data[: len(data) * 2 // 3])
    (images / "whole.jpg").write_bytes((images / "whole.jpg").read_bytes() + b"\0" * 4096)  # a camera's trailer
    message = refused(
        sr_tune(
            "train",
            str(REPO / "configs" / "smoke.yaml"),
            f"data.train={images}",
            "training.output_dir=runs",
            cwd=tmp_path,
        )
    )
    assert "truncated.png" in message and "bomb.png" in message and "data.skip_bad=true" in message
    assert all(f"cut.{suffix}" in message for suffix in ("jpg", "bmp", "webp")) and "whole." not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no mlflow.db, no runs/


def test_a_study_is_checked_in_one_round_with_its_data_and_nothing_is_created(tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    study = tmp_path / "study.yaml"
    study.write_text(f"""
name: one_round
base: {REPO / "configs" / "smoke.yaml"}
fixed: {{data.train: {images}, data.val: {tmp_path / "missing"}, training.output_dir: {tmp_path / "runs"}}}
search: {{optimizer.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-3}}}}
scheduler: {{name: asha, grace_period: 0}}
budget: {{num_samples: 2, max_stepz: 40}}
""")
    message = refused(sr_tune("tune", str(study), "--storage", "ftp://host/x", cwd=tmp_path))
    assert "5 problem(s)" in message
    assert "scheduler.grace_period: 0 is out of range (allowed: >= 1)" in message and "budget.max_stepz" in message
    assert "data.train:" in message and "truncated.jpg" in message and "data.val:" in message
    assert "--storage 'ftp://host/x'" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "study.yaml"]


def test_restart_removes_only_a_sweep_sr_tune_wrote(tmp_path: Path):
    study = tmp_path / "study.yaml"
    study.write_text(f"""
name: photos
base: {REPO / "configs" / "smoke.yaml"}
fixed: {{training.output_dir: {tmp_path / "runs"}}}
search: {{optimizer.lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-3}}}}
budget: {{num_samples: 2, max_steps: 40}}
""")
    storage = tmp_path / "my-data"  # a --storage root that already holds the user's own things
    user_files(storage / "photos")
    (storage / "photos.log").write_text("the user's own log")
    before = hashes(storage)
    message = refused(sr_tune("tune", str(study), "--restart", "--storage", str(storage), cwd=tmp_path))
    assert "not a sweep sr_tune wrote" in message and "removes nothing" in message
    assert hashes(storage) == before and sorted(p.name for p in tmp_path.iterdir()) == ["my-data", "study.yaml"]
