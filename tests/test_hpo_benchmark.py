"""The search-efficiency benchmark still runs (tiny sizes): it starts a local Ray, hence a Ray file of its own."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sr_tune.study import load_study

from .conftest import REPO


@pytest.mark.ray
def test_hpo_efficiency_compares_each_method_with_random_search_at_equal_budget(tmp_path: Path):
    args = [
        "--methods",
        "random,asha+tpe",
        "--seeds",
        "1",
        "--trials",
        "2",
        "--max-steps",
        "16",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "hpo_efficiency.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines() if line[:2] == "| "}
    assert rows["random"][-1].strip() == "1.00"  # random's own compute to reach its final best
    assert "asha+tpe" in rows

    reports = [json.loads(line) for line in (tmp_path / "hpo_efficiency.jsonl").read_text().splitlines()]
    budget = 2 * 16 * 16  # trials x steps x batch
    for method in ("random", "asha+tpe"):
        computes = [r["compute"] for r in reports if r["method"] == method]
        assert computes == sorted(computes) and budget <= computes[-1] <= budget + 4 * 2 * 16  # stopped at the budget
    random_trials = {r["trial"] for r in reports if r["method"] == "random"}
    assert len(random_trials) == 2 and sum(r["method"] == "random" for r in reports) == 16  # 8 evaluations each
    assert (tmp_path / "hpo_efficiency.png").stat().st_size > 10_000


def test_hpo_efficiency_takes_a_shipped_studys_space_and_recipe_with_its_own_budget(tmp_path: Path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import hpo_efficiency
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    args = argparse.Namespace(
        study=REPO / "search_spaces" / "photo_x2.yaml", max_steps=800, trials=12, grace=1, reduction_factor=3
    )
    study = hpo_efficiency.method_study("asha+tpe", 2, args, tmp_path)
    shipped = load_study(REPO / "search_spaces" / "photo_x2.yaml")
    assert study.search == shipped.search and study.fixed["optimizer.ema_decay"] == 0.999  # the study's own
    assert (study.sampler.name, study.sampler.seed, study.scheduler.name) == ("tpe", 2, "asha")
    assert (study.scheduler.grace_period, study.scheduler.reduction_factor) == (100, 3)
    assert (study.budget.num_samples, study.budget.max_steps, study.budget.max_concurrent) == (96, 800, 2)
    assert study.budget.time_limit_s == 0 and study.budget.final_steps == 0  # the benchmark's budget only
    assert study.eval_interval_steps() == 100


def test_each_evaluation_counts_once_though_tune_hands_a_finished_trials_last_result_over_twice(tmp_path: Path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import hpo_efficiency
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    stopper = hpo_efficiency.BudgetStopper(budget=96, interval_patches=32, log=tmp_path / "reports.jsonl")
    results = [("a", 2, 20.0), ("b", 2, 21.0), ("a", 4, 22.0), ("a", 4, 22.0), ("b", 4, 23.0), ("b", 4, 23.0)]
    for trial, step, psnr in results:  # the repeats are Tune's done=True copies
        stopper(trial, {"step": step, "val_psnr": psnr, "done": False})
    assert stopper.spent == 128 and stopper.stop_all()
    logged = [json.loads(line) for line in (tmp_path / "reports.jsonl").read_text().splitlines()]
    assert [(r["trial"], r["step"], r["compute"]) for r in logged] == [
        ("a", 2, 32),
        ("b", 2, 64),
        ("a", 4, 96),
        ("b", 4, 128),
    ]

    # A log written before the fix: its repeats counted as compute. Reading it recounts.
    old = tmp_path / "old.jsonl"
    lines = [("a", 2, 32), ("b", 2, 64), ("a", 4, 96), ("a", 4, 128), ("b", 4, 160), ("b", 4, 192)]
    old.write_text(
        "".join(
            json.dumps({"method": "random", "seed": 0, "trial": t, "step": s, "psnr": 1.0, "compute": c}) + "\n"
            for t, s, c in lines
        )
    )
    (reports,) = hpo_efficiency.read_reports(old, ["random"])["random"]
    assert [(r.trial, r.step, r.compute) for r in reports] == [("a", 2, 32), ("b", 2, 64), ("a", 4, 96), ("b", 4, 128)]
