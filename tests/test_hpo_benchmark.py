"""The search-efficiency benchmark still runs (tiny sizes): it starts a local Ray, hence a Ray file of its own."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sr_tune.study import load_study

from .conftest import REPO


@pytest.fixture(scope="module")
def hpo_efficiency():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import hpo_efficiency
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return hpo_efficiency


def photo_x2_args(*, max_steps: int, trials: int) -> argparse.Namespace:
    """The command line of ``--study search_spaces/photo_x2.yaml --grace 1 --reduction-factor 3``."""
    return argparse.Namespace(
        study=REPO / "search_spaces" / "photo_x2.yaml", max_steps=max_steps, trials=trials, grace=1, reduction_factor=3
    )


@pytest.mark.ray
def test_hpo_efficiency_compares_each_method_with_random_search_at_equal_budget(tmp_path: Path):
    args = [
        "--methods",
        "random,asha+tpe+delta_stn",  # ASHA + TPE, with Delta-STN inside its trials
        "--delta-stn-cost",
        "5",
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
    assert "asha+tpe+delta_stn" in rows

    reports = [json.loads(line) for line in (tmp_path / "hpo_efficiency.jsonl").read_text().splitlines()]
    budget = 2 * 16 * 16  # trials x steps x batch
    computes = [r["compute"] for r in reports if r["method"] == "random"]
    assert computes == sorted(computes) and budget <= computes[-1] <= budget + 4 * 2 * 16  # stopped at the budget
    # Each Delta-STN evaluation interval (2 steps of 16 patches) counts as 5 plain ones (--delta-stn-cost).
    stn = [r["compute"] for r in reports if r["method"] == "asha+tpe+delta_stn"]
    assert stn == [5 * 2 * 16 * (i + 1) for i in range(len(stn))] and budget <= stn[-1] <= budget + 2 * 5 * 2 * 16
    random_trials = {r["trial"] for r in reports if r["method"] == "random"}
    assert len(random_trials) == 2 and sum(r["method"] == "random" for r in reports) == 16  # 8 evaluations each
    assert (tmp_path / "hpo_efficiency.png").stat().st_size > 10_000


def test_hpo_efficiency_takes_a_shipped_studys_space_and_recipe_with_its_own_budget(tmp_path: Path, hpo_efficiency):
    args = photo_x2_args(max_steps=800, trials=12)
    study = hpo_efficiency.method_study("asha+tpe", 2, args, tmp_path)
    shipped = load_study(REPO / "search_spaces" / "photo_x2.yaml")
    assert study.search == shipped.search and study.fixed["optimizer.ema_decay"] == 0.999  # the study's own
    assert (study.sampler.name, study.sampler.seed, study.scheduler.name) == ("tpe", 2, "asha")
    assert (study.scheduler.grace_period, study.scheduler.reduction_factor) == (100, 3)
    assert (study.budget.num_samples, study.budget.max_steps, study.budget.max_concurrent) == (96, 800, 2)
    assert study.budget.time_limit_s == 0 and study.budget.final_steps == 0  # the benchmark's budget only
    assert study.eval_interval_steps() == 100


def test_each_evaluation_counts_once_though_tune_hands_a_finished_trials_last_result_over_twice(
    tmp_path: Path, hpo_efficiency
):
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


def test_the_delta_stn_method_tunes_l2_and_the_augmentation_strength_inside_its_trials(tmp_path: Path, hpo_efficiency):
    args = photo_x2_args(max_steps=800, trials=12)
    plain = hpo_efficiency.method_study("asha+tpe", 0, args, tmp_path)
    study = hpo_efficiency.delta_stn_study(plain)
    # TPE keeps what Delta-STN cannot tune; L2 (weight_decay w is lambda = w / 2) and the strength go inside.
    assert set(study.search) == set(plain.search) - {"optimizer.weight_decay", "data.augment_strength"}
    stn = study.base_config.delta_stn
    assert stn.enabled and stn.l2 == pytest.approx((math.sqrt(5e-10 * 5e-5), 5e-10, 5e-5))
    assert stn.augment_strength == pytest.approx((0.3, 0.0, 0.6)) and stn.warmup_steps == 100
    assert study.base_config.optimizer.weight_decay == 0 and study.base_config.data.augment_strength == 0

    # The built-in task: lr and clip norm stay searched, L2 goes inside; loss.mix weights would go too.
    builtin = hpo_efficiency.delta_stn_study(
        hpo_efficiency.method_study("asha+tpe", 0, argparse.Namespace(**{**vars(args), "study": None}), tmp_path)
    )
    assert set(builtin.search) == {"optimizer.lr", "optimizer.grad_clip_norm"}
    assert builtin.base_config.delta_stn.tuned == ("l2",)


def test_the_hand_set_recipe_is_one_run_of_the_whole_budget_at_the_base_configs_values(tmp_path: Path, hpo_efficiency):
    args = photo_x2_args(max_steps=400, trials=8)
    study = hpo_efficiency.method_study("recipe", 1, args, tmp_path)
    recipe = hpo_efficiency.recipe_study(study, 1, 8 * 400)
    assert (recipe.budget.num_samples, recipe.budget.max_steps) == (1, 3200) and recipe.eval_interval_steps() == 50
    config = recipe.trial_config({"training.seed": 1})
    # EDSR's paper values where the study searches, the study's fixed recipe around them.
    assert (config.optimizer.lr, config.data.batch_size, config.model.kwargs.get("num_blocks", 16)) == (1e-4, 16, 16)
    assert (config.optimizer.schedule, config.optimizer.ema_decay, config.training.seed) == ("cosine", 0.999, 1)
    assert config.training.steps == 3200
