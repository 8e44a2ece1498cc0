"""What `sr-tune train` shows on the console, through Ray's local mode and through 2 Ray Train workers: its
own lines, each once, and none of the libraries' INFO notes (MLflow's store set-up, Ray Train's report
dicts, torch.export's specialisation warning). Starts Ray: one of conftest.RAY_FILES."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

SHORT = ["training.steps=20", "training.eval_interval=10", "data.val_crop=48", "training.device=cpu"]
NOISE = (
    "Reported metrics",
    "Reporting training result",
    "Creating initial MLflow database",
    "specialized",
    "training worker group",  # the Ray Train controller's INFO notes
    "Requesting resources",
)


@pytest.mark.ray
@pytest.mark.parametrize("workers", [0, 2], ids=["local-mode", "two-workers"])
def test_train_shows_each_progress_line_once_and_no_library_notes(tmp_path: Path, workers: int):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_", "SR_TUNE_"))}
    done = subprocess.run(
        [sys.executable, "-m", "sr_tune", "train", str(REPO / "configs" / "smoke.yaml"), *SHORT]
        + [f"distributed.num_workers={workers}"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    for step in (10, 20):
        assert console.count(f"step     {step}/20") == 1, console[-3000:]
    assert not [noise for noise in NOISE if noise in console], console[-3000:]
    assert "done: PSNR-Y" in done.stdout
