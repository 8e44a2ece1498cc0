"""Pinned numbers: tiny deterministic CPU runs must reproduce the losses and validation metrics stored in
tests/assets (rtol 1e-4): configs/smoke.yaml for 30 steps (``smoke_pinned.json``), where a run stopped at step
20 and resumed must continue the same curve too, and the SRGAN loop (its two optimizers, VGG54 content loss
on the seeded random VGG the tests use, adversarial and discriminator losses) for 6 steps
(``gan_pinned.json``). A change that moves them on purpose re-pins with `python -m tests.test_pinned` and
says why in its commit."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from sr_tune.checkpoint import load_checkpoint
from sr_tune.config import TrainConfig, load_config
from sr_tune.engine import TrainResult, train
from sr_tune.results import EvalResult

from .conftest import ASSETS, REPO, write_vgg_weights

RTOL = 1e-4
SMOKE = ["training.steps=30", "training.eval_interval=10", "training.device=cpu", "data.val_crop=48"]
GAN = [
    "model.kwargs={num_blocks: 2}",
    "data.lr_patch_size=8",
    "data.batch_size=4",
    "data.val_crop=32",
    "training.steps=6",
    "training.eval_interval=2",
    "training.device=cpu",
    "training.init_from=null",
]
PINS = {  # asset -> (config, overrides)
    "smoke_pinned.json": ("configs/smoke.yaml", SMOKE),
    "gan_pinned.json": ("configs/srgan_x4.yaml", GAN),
}


def pinned_config(asset: str) -> TrainConfig:
    path, overrides = PINS[asset]
    return load_config(REPO / path, overrides)


def curve(history: list[EvalResult]) -> list[dict[str, float]]:
    return [
        {
            "step": r.step,
            "loss": r.loss,
            **{f"loss_{k}": v for k, v in r.losses.items()},
            "val_psnr": r.psnr,
            "val_ssim": r.ssim,
            **{f"val_{k}": v for k, v in r.vgg.items()},
            "bicubic_psnr": r.bicubic_psnr,
        }
        for r in history
    ]


def run(asset: str, **options) -> TrainResult:
    torch.set_num_threads(2)  # the pinned run's threads; CI has 2 cores
    return train(pinned_config(asset), **options)


def assert_on_the_pinned_curve(asset: str, history: list[EvalResult]) -> None:
    pinned = json.loads((ASSETS / asset).read_text())["curve"]
    got = curve(history)
    assert [point["step"] for point in got] == [point["step"] for point in pinned]
    for point, expected in zip(got, pinned):
        assert point == pytest.approx(expected, rel=RTOL), f"step {point['step']}"


def test_a_tiny_smoke_run_reproduces_its_pinned_losses_and_psnr():
    assert_on_the_pinned_curve("smoke_pinned.json", run("smoke_pinned.json").history)


def test_a_run_stopped_at_step_20_and_resumed_continues_the_pinned_curve(tmp_path: Path):
    stopped = run("smoke_pinned.json", checkpoint_dir=tmp_path, on_eval=lambda result, _: result.step == 20)
    assert [r.step for r in stopped.history] == [10, 20]
    resumed = run("smoke_pinned.json", checkpoint_dir=tmp_path, resume=load_checkpoint(tmp_path / "last"))
    assert_on_the_pinned_curve("smoke_pinned.json", resumed.history)


def test_a_tiny_srgan_run_reproduces_its_pinned_generator_and_discriminator_losses(vgg_cache: Path):
    result = run("gan_pinned.json")
    assert set(result.final.losses) == {"perceptual", "adversarial", "discriminator"}
    assert_on_the_pinned_curve("gan_pinned.json", result.history)


if __name__ == "__main__":  # re-pin: python -m tests.test_pinned
    with tempfile.TemporaryDirectory() as home:
        os.environ["TORCH_HOME"] = home
        write_vgg_weights()
        for asset, (path, overrides) in PINS.items():
            record = {"config": path, "overrides": overrides, "torch": torch.__version__}
            (ASSETS / asset).write_text(json.dumps({**record, "curve": curve(run(asset).history)}, indent=2) + "\n")
