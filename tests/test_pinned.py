"""Pinned numbers: a tiny deterministic CPU run of configs/smoke.yaml (30 steps) must reproduce the losses and
validation PSNR stored in tests/assets/smoke_pinned.json (rtol 1e-4), and a run stopped at step 20 and
resumed must continue the same curve. A change that moves them on purpose re-pins with
`python -m tests.test_pinned` and says why in its commit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sr_tune.checkpoint import load_checkpoint
from sr_tune.config import load_config
from sr_tune.engine import EvalResult, TrainResult, train

from .conftest import ASSETS, REPO

PINNED = ASSETS / "smoke_pinned.json"
OVERRIDES = ["training.steps=30", "training.eval_interval=10", "training.device=cpu", "data.val_crop=48"]
RTOL = 1e-4


def smoke_config():
    return load_config(REPO / "configs" / "smoke.yaml", OVERRIDES)


def curve(history: list[EvalResult]) -> list[dict[str, float]]:
    return [
        {
            "step": r.step,
            "loss": r.loss,
            **{f"loss_{k}": v for k, v in r.losses.items()},
            "val_psnr": r.psnr,
            "val_ssim": r.ssim,
            "bicubic_psnr": r.bicubic_psnr,
        }
        for r in history
    ]


def run(**options) -> TrainResult:
    torch.set_num_threads(2)  # the pinned run's threads; CI has 2 cores
    return train(smoke_config(), **options)


def assert_on_the_pinned_curve(history: list[EvalResult]) -> None:
    pinned = json.loads(PINNED.read_text())["curve"]
    got = curve(history)
    assert [point["step"] for point in got] == [point["step"] for point in pinned]
    for point, expected in zip(got, pinned):
        assert point == pytest.approx(expected, rel=RTOL), f"step {point['step']}"


def test_a_tiny_smoke_run_reproduces_its_pinned_losses_and_psnr():
    assert_on_the_pinned_curve(run().history)


def test_a_run_stopped_at_step_20_and_resumed_continues_the_pinned_curve(tmp_path: Path):
    stopped = run(checkpoint_dir=tmp_path, on_eval=lambda result, _: result.step == 20)
    assert [r.step for r in stopped.history] == [10, 20]
    resumed = run(checkpoint_dir=tmp_path, resume=load_checkpoint(tmp_path / "last"))
    assert_on_the_pinned_curve(resumed.history)


if __name__ == "__main__":  # re-pin: python -m tests.test_pinned
    PINNED.write_text(
        json.dumps(
            {
                "config": "configs/smoke.yaml",
                "overrides": OVERRIDES,
                "torch": torch.__version__,
                "curve": curve(run().history),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {PINNED}", file=sys.stderr)
