"""Stopping a command with Ctrl-C (SIGINT) or SIGTERM, and killing one while it writes a checkpoint: the line
the user sees, the exit code, the MLflow run state, and the last checkpoint, which still loads."""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sr_tune.checkpoint import load_checkpoint, save_checkpoint
from sr_tune.config import load_config
from sr_tune.models import create_model

from ..conftest import REPO


def wait_for(condition, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_a_stopped_training_says_how_to_continue_and_its_resume_continues_the_same_run(tmp_path: Path, stop, code):
    overrides = [
        "training.device=cpu",
        "training.steps=200",
        "training.eval_interval=20",
        "data.val_crop=48",
        f"training.output_dir={tmp_path / 'runs'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    config = str(REPO / "configs" / "smoke.yaml")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "sr_tune", "train", config, *overrides]
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As in a terminal: a shell's background job (CI's runner, for one) starts with SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL) if stop == signal.SIGINT else None,
    )
    last = tmp_path / "runs" / "srcnn_915_x3" / "last"
    try:
        wait_for(lambda: last.is_dir(), process)
        process.send_signal(stop)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    said = stderr.strip().splitlines()[-1]
    assert said.startswith(f"sr-tune: training of srcnn_915_x3 stopped: its last checkpoint, {last}, is intact")
    stopped_at = load_checkpoint(last).step
    assert 20 <= stopped_at < 200 and stopped_at % 20 == 0

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("sr_tune").experiment_id])
    assert run.info.status == "KILLED"
    if stop == signal.SIGTERM:
        return  # continued as after Ctrl-C

    again = shlex.split(said.split("continue with: ", 1)[1])
    assert again[:2] == ["sr-tune", "train"] and again[-1] == "--resume"
    resumed = subprocess.run(
        [sys.executable, "-m", "sr_tune", *again[1:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("sr_tune").experiment_id])
    assert run.info.status == "FINISHED" and load_checkpoint(last).step == 200
    # One history across the stop: every evaluation once, none missing.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")] == list(range(20, 201, 20))


WRITER = """
import sys
from sr_tune.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from sr_tune.config import load_config
from sr_tune.models import create_model

folder = sys.argv[1]
config = load_config(None, ["model.name=fsrcnn", "model.scale=2"])
model = create_model("fsrcnn", scale=2)
step = load_checkpoint(folder).step if has_checkpoint(folder) else 0
while True:
    step += 1
    save_checkpoint(folder, model=model, config=config, step=step)
    print(step, flush=True)
"""


def test_a_process_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path: Path):
    """SIGKILL at random moments of a loop that only writes checkpoints: every save that returned survives."""
    folder = tmp_path / "last"
    shuffle = random.Random(0)
    for _ in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        saved = [int(writer.stdout.readline())]  # the first save returned: the writer is in its loop
        time.sleep(shuffle.uniform(0.05, 0.5))
        writer.kill()
        saved += [int(line) for line in writer.stdout.read().split()]
        writer.wait()
        assert load_checkpoint(folder).step >= saved[-1]  # what was reported written is there, and loads


def test_the_previous_checkpoint_is_put_back_when_a_save_was_killed_between_its_renames(tmp_path: Path):
    config = load_config(None, ["model.name=fsrcnn", "model.scale=2"])
    folder = save_checkpoint(tmp_path / "last", model=create_model("fsrcnn", scale=2), config=config, step=7)
    # What disk holds when a save is killed after moving the old folder aside and before renaming the new
    # one into place: the new one's staging folder and the old one, aside.
    staging = save_checkpoint(tmp_path / ".last.staging", model=create_model("fsrcnn", scale=2), config=config, step=8)
    os.replace(folder, tmp_path / ".last.old")
    assert not folder.exists() and staging.is_dir()
    assert load_checkpoint(folder).step == 7 and not (tmp_path / ".last.old").exists()
    save_checkpoint(folder, model=create_model("fsrcnn", scale=2), config=config, step=9)
    assert load_checkpoint(folder).step == 9
