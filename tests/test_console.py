"""The sweep's console without Ray: the live view's table and lines, trial names, and Ray's output sent to a file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sr_tune.console import SweepView, format_value, trial_label
from sr_tune.study import load_study

from .conftest import write_sweep_study


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


@pytest.fixture
def study(tmp_path: Path):
    body = """
name: console
search:
  optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  optimizer.weight_decay: {type: loguniform, low: 1.0e-8, high: 1.0e-3}
  data.batch_size: {type: choice, values: [8, 16]}
budget: {num_samples: 4, max_steps: 100}
"""
    return load_study(write_sweep_study(tmp_path, body))  # 100 steps at batch 8: 800 patches per trial


PARAMS = {"optimizer.lr": 2.1e-3, "optimizer.weight_decay": 3.8e-5, "data.batch_size": 16}


def test_trials_are_named_by_number_and_searched_values():
    assert trial_label("t03", PARAMS) == "t03 lr=2.1e-3 wd=3.8e-5 bs=16"
    values = (0.25, 1e-8, 5e3, 0.0, "adamw", 32)
    assert [format_value(v) for v in values] == ["0.25", "1.0e-8", "5.0e3", "0", "adamw", "32"]


def test_plain_lines_tell_trial_events_and_a_progress_line_every_interval(study):
    out, clock = io.StringIO(), Clock()
    view = SweepView(study, out, live=False, interval_s=30, now=clock)
    view.started("a", "t01", PARAMS)
    clock.seconds = 10
    view.reported("a", {"step": 50, "patches_seen": 400, "val_psnr": 29.1, "psnr_gain": 0.1})
    view.tick()  # 10 s after the last line: nothing
    view.started("b", "t02", {**PARAMS, "data.batch_size": 8})
    clock.seconds = 20
    view.reported("b", {"step": 50, "patches_seen": 400, "val_psnr": 28.0, "psnr_gain": -1.0})
    view.ended("b", "stopped")
    clock.seconds = 60
    view.reported("a", {"step": 100, "patches_seen": 800, "val_psnr": 29.5, "psnr_gain": 0.5})
    view.tick()
    assert out.getvalue().splitlines() == [
        "study console: tpe + asha, 4 trial(s) of up to 100 steps, max val_psnr",
        "0:00 t01 lr=2.1e-3 wd=3.8e-5 bs=16 started",
        "0:10 t02 lr=2.1e-3 wd=3.8e-5 bs=8 started",
        "0:20 t02 lr=2.1e-3 wd=3.8e-5 bs=8 stopped at step 50: best val_psnr 28.0000 (-1.00 dB vs bicubic)",
        # 1200 of at most 800 + 400 + 2 * 800 patches in 60 s: 1600 left at 20 patches/s.
        "1 running, 1 stopped, 2 pending | best t01 val_psnr 29.5000 (+0.50 dB vs bicubic) | running t01 step 100 "
        "| elapsed 1:00 | ETA <= 1:20",
    ]
    view.ended("a", "failed", "FileNotFoundError: /missing")
    assert out.getvalue().splitlines()[-2:] == [
        "1:00 t01 lr=2.1e-3 wd=3.8e-5 bs=16 failed at step 100: best val_psnr 29.5000 (+0.50 dB vs bicubic)",
        "    FileNotFoundError: /missing",
    ]
    # A resumed sweep's trials that had ended before: counted silently, known ones left as they are.
    view.restored("c", "t03", PARAMS, "done", {"step": 100, "patches_seen": 800, "val_psnr": 29.7, "psnr_gain": 0.7})
    view.restored("a", "t01", PARAMS, "done", {})
    view.close()
    assert out.getvalue().splitlines()[-1] == (
        # 2000 patches in 60 s; one trial of 800 left.
        "1 done, 1 stopped, 1 failed, 1 pending | best t03 val_psnr 29.7000 (+0.70 dB vs bicubic) | elapsed 1:00 "
        "| ETA <= 0:24"
    )


def test_on_a_terminal_one_table_is_redrawn_in_place_below_the_messages(study):
    out, clock = io.StringIO(), Clock()
    view = SweepView(study, out, live=True, now=clock)
    view.started("a", "t01", PARAMS)
    clock.seconds = 5
    view.reported("a", {"step": 50, "patches_seen": 400, "val_psnr": 29.1, "psnr_gain": 0.1})
    assert view.table() == [
        "trial status      step   patches   val_psnr  vs bicubic        lr        wd        bs",
        "t01   running       50       400    29.1000    +0.10 dB    2.1e-3    3.8e-5        16",
        "1 running, 3 pending | best t01 val_psnr 29.1000 (+0.10 dB vs bicubic) | elapsed 0:05 | ETA <= 0:35",
    ]
    view.message("warning: something to keep")
    text = out.getvalue()
    # Each redraw moves up over the previous table (3 lines) and erases it; the message stays above.
    assert text.count("\x1b[3F\x1b[J") == 2
    assert text.endswith("warning: something to keep\n" + "\n".join(view.table()) + "\n")


def test_ray_output_goes_to_the_log_file_and_the_view_to_the_console(tmp_path: Path):
    log = tmp_path / "sweep.log"
    script = f"""
import os, sys
from pathlib import Path
from sr_tune.console import ray_output_to
print("before", flush=True)
with ray_output_to(Path({str(log)!r})) as console:
    print("python stdout")
    print("python stderr", file=sys.stderr)
    os.write(1, b"fd 1 from C\\n")
    os.write(2, b"fd 2 from C\\n")
    console.write("the view\\n")
print("after")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["before", "the view", "after"] and result.stderr == ""
    written = log.read_text().splitlines()
    assert written[0].startswith("--- ") and sorted(written[1:]) == [
        "fd 1 from C",
        "fd 2 from C",
        "python stderr",
        "python stdout",
    ]


def test_the_live_tables_columns_are_as_wide_as_their_longest_value(tmp_path: Path):
    body = """
name: wide
search:
  loss.pixel: {type: choice, values: [l1, charbonnier]}
  data.augment_strength: {type: uniform, low: 0.0, high: 0.3}
budget: {num_samples: 2, max_steps: 100}
"""
    view = SweepView(load_study(write_sweep_study(tmp_path, body)), io.StringIO(), live=True, now=Clock())
    view.started("a", "t01", {"loss.pixel": "charbonnier", "data.augment_strength": 0.0213})
    view.started("b", "t02", {"loss.pixel": "l1", "data.augment_strength": 0.25})
    assert view.table()[:3] == [
        "trial status      step   patches   val_psnr  vs bicubic        pixel       aug",
        "t01   running        0         0          -           -  charbonnier    0.0213",
        "t02   running        0         0          -           -           l1      0.25",
    ]
