"""A sweep whose driver is killed mid-flight, resumed with `sr-tune tune --resume`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sr_tune.tracking import TRIAL_TAG

from .conftest import mlflow_runs, write_sweep_study as write_study

# Its own module, so no Ray from other sweep tests runs beside the subprocesses' (see tests/test_sweep.py).
pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("ray")]


def _reports(trial_dir: Path) -> list[dict]:
    lines = (trial_dir / "result.json").read_text().splitlines() if (trial_dir / "result.json").is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def test_a_killed_sweep_resumes_without_rerunning_finished_trials_or_duplicating_runs(tmp_path: Path):
    path = write_study(tmp_path, """
name: resumable
search:
  optimizer.lr: {type: loguniform, low: 3.0e-4, high: 3.0e-3}
sampler: {name: random, seed: 0}
scheduler: {name: none}
budget: {num_samples: 4, max_steps: 120}
""")
    experiment = tmp_path / "runs" / "sweeps" / "resumable"
    # A user's shell: a Ray of its own, and the store the study names (MLflow calls in this test process set
    # MLFLOW_TRACKING_URI, which a child process would take as the user's choice).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    command = [sys.executable, "-m", "sr_tune", "tune", str(path)]
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    finished, in_flight = {}, set()
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and not (finished and in_flight):
            time.sleep(0.5)
            for trial_dir in experiment.glob("trial_*"):
                reports = _reports(trial_dir)
                if reports and reports[-1]["step"] == 120:
                    finished[trial_dir.name] = len(reports)
                elif reports and any(trial_dir.glob("checkpoint_*")):
                    in_flight.add(trial_dir.name)
        assert finished and in_flight, "the sweep never had a finished and a running trial at once"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its local Ray and every trial, mid-flight
        driver.wait()
    in_flight -= set(finished)
    interrupted = {name: max(r["step"] for r in _reports(experiment / name)) for name in in_flight}

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "best 4 of 4 trial(s) of resumable" in resumed.stdout and "mlflow ui --backend-store-uri" in resumed.stdout

    trial_dirs = sorted(experiment.glob("trial_*"))
    assert len(trial_dirs) == 4
    for name, count in finished.items():  # finished trials were kept, not trained again
        assert len(_reports(experiment / name)) == count
    for trial_dir in trial_dirs:
        assert _reports(trial_dir)[-1]["step"] == 120
    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags[TRIAL_TAG] for c in children} == {d.name.removeprefix("trial_") for d in trial_dirs}
    for child in children:
        assert child.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_psnr")]
        assert set(steps) == {20, 40, 60, 80, 100, 120}
        name = f"trial_{child.data.tags[TRIAL_TAG]}"
        if name in interrupted:
            # Continued from its last checkpoint in Tune: what it had reported was not trained again.
            assert steps.count(20) == 1 and interrupted[name] >= 20
            train_runs = tmp_path / "runs" / "sweeps" / "resumable.train"
            assert list(train_runs.glob(f"{child.data.tags[TRIAL_TAG]}-from-*")), "not started from its checkpoint"
