"""The benchmark scripts still run (tiny sizes): they are not tests of speed, and assert nothing about it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO


def run_script(name: str, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_train_step_prints_the_engine_to_bare_ratio_of_each_model():
    lines = run_script("train_step.py", "--models", "espcn,fsrcnn", "--steps", "3", "--warmup", "2", "--repeats", "1")
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    rows = [line.split() for line in lines[header + 1 :]]
    assert [row[0] for row in rows] == ["espcn", "fsrcnn"]
    assert all(float(row[-1]) > 0 and row[-2].endswith("%") for row in rows)


def test_upscale_prints_throughput_and_memory_of_each_tile_beside_the_whole_image():
    lines = run_script("upscale.py", "--quick", "--model", "fsrcnn_s", "--scale", "2", "--tiles", "64")
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["tile"])
    rows = [line.split() for line in lines[header + 1 :]]
    assert [row[0] for row in rows] == ["whole", "64"]
    assert rows[0][-1] == "1.00x" and float(rows[1][-1].rstrip("x")) > 0


def test_sampler_prints_the_ratio_to_a_classic_dataloader_for_each_augmentation():
    lines = run_script("sampler.py", "--quick", "--workers", "1")
    header = next(i for i, line in enumerate(lines) if line.startswith("augmentation"))
    rows = [line.rsplit(None, 3) for line in lines[header + 1 :]]
    assert [row[0] for row in rows] == ["flips/rot90", "flips + warps at strength 1"]
    for _, classic, ours, ratio in rows:
        classic_rate, ours_rate = float(classic.replace(",", "")), float(ours.replace(",", ""))
        assert classic_rate > 0 and ours_rate > 0
        # The rates are printed whole, the ratio to 0.1, each from the unrounded rates.
        assert float(ratio.rstrip("x")) == pytest.approx(ours_rate / classic_rate, rel=1 / classic_rate, abs=0.051)


def test_photo_x2_scores_bicubic_waifu2x_and_the_recipe_on_the_held_out_photographs(waifu2x_wheel: Path):
    lines = run_script("photo_x2.py", "--quick", "--waifu2x", str(waifu2x_wheel))
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    rows = {line[:40].strip(): line[40:].split() for line in lines[header + 1 :]}
    assert list(rows) == ["bicubic", "waifu2x vgg_7 (Y, published)", "hand-set FSRCNN recipe, 40 steps"]
    bicubic, waifu2x = float(rows["bicubic"][0]), float(rows["waifu2x vgg_7 (Y, published)"][0])
    # Each difference comes from the unrounded values: within a rounding step of the printed ones.
    assert rows["bicubic"][1] == "+0.00" and rows["waifu2x vgg_7 (Y, published)"][2] == "+0.00"
    assert float(rows["bicubic"][2]) == pytest.approx(bicubic - waifu2x, abs=0.011)
    assert float(rows["waifu2x vgg_7 (Y, published)"][1]) == pytest.approx(waifu2x - bicubic, abs=0.011)
    # The published weights beat bicubic even on the photographs' flat 96-pixel corners (+0.31 dB here).
    assert waifu2x > bicubic + 0.1
    assert rows["hand-set FSRCNN recipe, 40 steps"][-1].endswith("s")


def test_delta_stn_compares_with_fixed_values_from_the_same_start_and_logs_each_run_as_it_ends(tmp_path: Path):
    args = [
        "--quick",
        "--methods",
        "delta_stn,fixed",
        "--first-seed",
        "3",
        "--l2-start",
        "1e-3",
        "--out",
        str(tmp_path),
    ]
    lines = run_script("delta_stn.py", *args)
    assert lines[0].startswith("per step: plain") and "Delta-STN" in lines[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in lines if line[:2] == "| "}
    assert set(rows) >= {"delta_stn", "fixed"}
    log = [json.loads(line) for line in (tmp_path / "delta_stn.jsonl").read_text().splitlines()]
    assert log[0]["ratio"] > 1 and [(r["method"], r["seed"]) for r in log[1:]] == [("delta_stn", 3), ("fixed", 3)]
    history = log[1]["history"]
    assert history[0]["l2"] == pytest.approx(1e-3) and {"augment_strength", "mix_mse", "val_psnr"} <= set(history[0])
    assert (tmp_path / "delta_stn.png").stat().st_size > 10_000
