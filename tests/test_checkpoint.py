"""Checkpoints: safetensors + JSON round trip, atomic replace, pickle refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sr_tune.checkpoint import META_FILE, WEIGHTS_FILE, RunState, load_checkpoint, save_checkpoint
from sr_tune.config import load_config
from sr_tune.models import create_model
from sr_tune.results import EvalResult


def test_round_trip_rebuilds_the_same_model(tmp_path: Path):
    config = load_config(None, ["model.name=fsrcnn", "model.scale=2", "data.color=rgb"])
    torch.manual_seed(3)
    model = create_model("fsrcnn", scale=2, in_channels=3).eval()
    save_checkpoint(tmp_path / "ckpt", model=model, config=config, step=12, metrics={"val_psnr": 30.5})

    checkpoint = load_checkpoint(tmp_path / "ckpt")
    assert checkpoint.config == config and checkpoint.step == 12 and checkpoint.metrics == {"val_psnr": 30.5}
    lr = torch.rand(1, 3, 10, 10)
    torch.testing.assert_close(checkpoint.build_model()(lr), model(lr), rtol=0, atol=0)


def test_saving_again_replaces_atomically_and_leaves_no_temporaries(tmp_path: Path):
    config = load_config()
    model = create_model("srcnn_915", scale=3)
    save_checkpoint(tmp_path / "ckpt", model=model, config=config, step=1)
    save_checkpoint(tmp_path / "ckpt", model=model, config=config, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [META_FILE, WEIGHTS_FILE]
    assert load_checkpoint(tmp_path / "ckpt").step == 2


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path):
    config = load_config()
    model = create_model("srcnn_915", scale=3)
    save_checkpoint(tmp_path / "ckpt", model=model, config=config, step=1)
    shared = torch.nn.Linear(2, 2)
    shared.bias = torch.nn.Parameter(shared.weight[0])  # safetensors refuses tensors that share memory
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ckpt", model=shared, config=config, step=2)
    assert load_checkpoint(tmp_path / "ckpt").step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_pickle_checkpoints_are_refused(tmp_path: Path):
    pickled = tmp_path / "model.pth"
    torch.save(create_model("srcnn_915", scale=3).state_dict(), pickled)
    with pytest.raises(ValueError, match="pickle checkpoints are refused"):
        load_checkpoint(pickled)


def test_missing_or_corrupt_parts_are_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_FILE}: missing"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path / "ckpt", model=create_model("srcnn_915", scale=3), config=load_config(), step=0)
    meta = tmp_path / "ckpt" / META_FILE
    data = json.loads(meta.read_text())
    data["config"]["optimizer"]["lr"] = -1
    meta.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"(?s)checkpoint.json.*optimizer.lr: -1.0 is out of range"):
        load_checkpoint(tmp_path / "ckpt")
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="checkpoint.json: not valid JSON"):
        load_checkpoint(tmp_path / "ckpt")


def test_truncated_weights_or_a_pickle_in_their_place_are_named(tmp_path: Path):
    model = create_model("srcnn_915", scale=3)
    save_checkpoint(tmp_path / "ckpt", model=model, config=load_config(), step=0)
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        load_checkpoint(tmp_path / "ckpt")
    torch.save(model.state_dict(), weights)  # a real pickle renamed: never unpickled
    with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_runs_state_round_trips_typed_and_a_foreign_one_is_named(tmp_path: Path):
    config = load_config(None, ["model.name=espcn"])
    evaluation = EvalResult(
        step=5,
        loss=0.1,
        losses={"pixel": 0.1},
        lr=1e-3,
        psnr=20.0,
        ssim=0.5,
        bicubic_psnr=19.0,
        bicubic_ssim=0.4,
        patches_per_second=10.0,
        seconds=1.0,
    )
    run = RunState((evaluation,), "abc123")
    save_checkpoint(tmp_path / "last", model=create_model("espcn", scale=2), config=config, step=5, run=run)
    assert load_checkpoint(tmp_path / "last").run == run
    save_checkpoint(tmp_path / "best", model=create_model("espcn", scale=2), config=config, step=5)
    assert load_checkpoint(tmp_path / "best").run == RunState()  # weights only
    meta = json.loads((tmp_path / "last" / META_FILE).read_text())
    meta["state"]["history"] = [{"step": 5, "not_a_field": 1}]
    (tmp_path / "last" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"checkpoint.json: state: not a training state sr_tune wrote"):
        load_checkpoint(tmp_path / "last")


def test_an_empty_checkpoint_path_is_refused_by_name_and_the_current_folder_is_read(tmp_path: Path, monkeypatch):
    with pytest.raises(ValueError, match="the checkpoint path is empty"):
        load_checkpoint("")
    save_checkpoint(tmp_path / "ckpt", model=create_model("srcnn_915", scale=3), config=load_config(), step=4)
    monkeypatch.chdir(tmp_path / "ckpt")
    assert load_checkpoint(".").step == 4
