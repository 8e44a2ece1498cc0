"""A sweep on a local Ray, as a user runs it (`sr-tune tune`), through the faults of a long sweep: its driver
killed with everything it started (SIGKILL), then stopped (SIGTERM) and continued with the command it
printed; one of its trials diverges. Nothing finished is lost, every trial ends with one metric history,
and the run states say what happened. Starts Ray: runs with the Ray files (conftest.RAY_FILES)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ..conftest import write_sweep_study
from ..listeners import _descendants

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def start_tune(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sr_tune", "tune", "study.yaml", *args],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def evaluations(client: MlflowClient) -> dict[str, list[int]]:
    """{trial run name: its val_psnr steps} of the sweep's nested runs."""
    experiment = client.get_experiment_by_name("sr_tune")
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`sr_tune.trial_id` != ''")
    return {run.info.run_name: [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr")] for run in runs}


def wait_for(condition, process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            raise AssertionError(process.communicate()[1][-3000:])
        assert time.monotonic() < deadline, "timed out"
        time.sleep(1)


def test_a_sweep_survives_its_driver_killed_then_stopped_and_a_diverging_trial(tmp_path: Path):
    write_sweep_study(
        tmp_path,
        """
name: faults
search:
  optimizer.lr: {type: choice, values: [1.0e-3, 10.0]}  # 10 at momentum 0.99: the loss leaves the finite numbers
sampler: {name: grid, seed: 0}
scheduler: {name: none}
budget: {max_steps: 300, max_concurrent: 2}  # long enough that the SIGTERM below lands mid-training
resources: {workers: 1, cpus_per_worker: 1}
""",
        fixed="  optimizer.name: sgd\n  optimizer.momentum: 0.99\n",
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    # 1. The driver and everything it started (its local Ray) killed at once, once the good trial has logged.
    first = start_tune(tmp_path)
    wait_for(lambda: any(steps for steps in evaluations(client).values()), first)
    tree = _descendants(first.pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    logged_before = sum(len(steps) for steps in evaluations(client).values())

    # 2. Continued, then stopped with SIGTERM once it logged more: one line says how to continue; exit 143.
    second = start_tune(tmp_path, "--resume")
    wait_for(lambda: sum(len(steps) for steps in evaluations(client).values()) > logged_before, second)
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=180)
    assert second.returncode == 143, stderr[-3000:]
    said = stderr.strip().splitlines()[-1]
    assert said.startswith("sr-tune: sweep 'faults' stopped with ") and "trial(s) unfinished" in said, said
    experiment = client.get_experiment_by_name("sr_tune").experiment_id
    (parent,) = client.search_runs(
        [experiment], filter_string="tags.`sr_tune.study` = 'faults' and tags.`mlflow.parentRunId` IS NULL"
    ) or [None]
    assert parent is not None and parent.info.status == "KILLED"
    assert all(run.info.status != "RUNNING" for run in client.search_runs([experiment]))

    # 3. The printed command finishes it: exit 0, as one trial succeeded; the diverged one is FAILED and why.
    again = shlex.split(said.split("continue with: ", 1)[1])
    assert again[:3] == ["sr-tune", "tune", "study.yaml"] and "--resume" in again
    third = subprocess.run(
        [sys.executable, "-m", "sr_tune", *again[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_"))},
    )
    assert third.returncode == 0, third.stderr[-3000:]
    runs = client.search_runs([experiment])
    parent = next(run for run in runs if run.info.run_id == parent.info.run_id)
    trials = {run.data.params["optimizer.lr"]: run for run in runs if "sr_tune.trial_id" in run.data.tags}
    assert parent.info.status == "FINISHED" and sorted(trials) == ["0.001", "10.0"]  # no trial run twice
    good, diverged = trials["0.001"], trials["10.0"]
    assert good.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(good.info.run_id, "val_psnr")] == list(range(20, 301, 20))
    assert diverged.info.status == "FAILED"
    assert "loss term pixel" in diverged.data.tags["sr_tune.error"] and "step " in diverged.data.tags["sr_tune.error"]
    assert "failed" in third.stdout and "not finite" in third.stdout  # the summary lists it, with its reason
