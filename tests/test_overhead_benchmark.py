"""The sweep-overhead benchmark still runs (its ``--quick`` study): it starts a local Ray through ``sr-tune tune``,
hence a Ray file of its own."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.ray
def test_ray_overhead_splits_the_slots_time_of_a_real_sweep():
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ray_overhead.py"), "--quick"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    line = r"wall ([\d.]+) s, trained ([\d.]+) s \(\+([\d.]+) s in shared slots\), overhead ([\d.]+)%"
    run = re.search(line, done.stdout)
    assert run, done.stdout
    wall, trained, shared, overhead = map(float, run.groups())
    assert 0 < trained < 4 * wall and shared >= 0
    # The line prints seconds to 0.05 s and the overhead to 0.05 points: what that rounding can move it by.
    rounding = 100 * (2 * 0.05 / (2 * wall) + (trained + shared) * 0.05 / (2 * wall**2)) + 0.05
    assert overhead == pytest.approx(100 * (1 - (trained + shared) / (2 * wall)), abs=rounding)
    parts = done.stdout.split("where the CPU slots' time went (medians):")[1].splitlines()[2]
    shares = [float(value) for value in re.findall(r"(-?[\d.]+)%", parts)]
    # before the sweep, in trials not training, between trials, after the last trial, training: all of the slots
    assert len(shares) == 5 and sum(shares) == pytest.approx(100, abs=0.3)
    before, after, training = shares[0], shares[3], shares[4]
    assert before > 0 and after > 0  # Ray's start before the parent run, its stop after the last trial
    assert training == pytest.approx(100 - overhead, abs=0.1)
