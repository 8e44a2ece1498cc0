"""Which hyperparameters mattered, from trials built by hand (no Ray): fANOVA finds the key that drives the
objective, refuses to guess from too little, and its words reach the console line, the parent run's
description, a CSV and a chart."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from sr_tune.importance import importance
from sr_tune.summary import parent_description, summarize
from sr_tune.visualize import importance_figure

from .test_summary import record, study  # noqa: F401  (the fixture)


def trials(count: int, *, lr_range: tuple[float, float] = (1e-4, 1e-2)) -> list:
    """val_psnr driven by log(lr) (a 1 dB swing), the augmentation strength and batch size adding noise."""
    draw = random.Random(0)
    records = []
    for index in range(count):
        lr = math.exp(draw.uniform(math.log(lr_range[0]), math.log(lr_range[1])))
        psnr = 29.0 + 0.25 * (math.log10(lr) + 4) + draw.uniform(0, 0.02)
        base = record(f"{index:02d}", lr, [psnr], batch=draw.choice([8, 16]))
        params = {**base.params, "data.augment_strength": draw.random()}
        records.append(dataclasses.replace(base, params=params))
    return records


def test_the_key_that_drives_the_objective_gets_almost_all_its_variance(study):  # noqa: F811
    found = importance(study, trials(12))
    assert found is not None and list(found.shares)[0] == "optimizer.lr" and found.shares["optimizer.lr"] > 0.8
    assert sum(found.shares.values()) == pytest.approx(1.0) and found.trials == 12 and found.patches == 160
    line = found.line("val_psnr")
    assert line.startswith("what mattered for val_psnr (fANOVA over 12 trials at 160 patches): optimizer.lr ")
    assert found.csv().splitlines()[0] == "parameter,importance" and len(found.csv().splitlines()) == 4
    description = parent_description(
        study, summarize(study, trials(12)), "1", {}, importance=found.markdown("val_psnr")
    )
    assert "### What mattered for `val_psnr`" in description and "| `optimizer.lr` | " in description
    bars = importance_figure(found.shares, "val_psnr").axes[0].patches
    assert max(bar.get_width() for bar in bars) == pytest.approx(found.shares["optimizer.lr"])


def test_trials_are_compared_at_the_data_every_one_of_them_saw(study):  # noqa: F811
    # Batch 16 trials ran on to a second report, batch 8 ones were stopped at the first: compared at their best,
    # batch size would look decisive; at the data every trial saw, the learning rate is what tells them apart.
    records = []
    for trial in trials(12):
        lr, first = trial.params["optimizer.lr"], float(trial.reports["val_psnr"].iloc[0])
        batch = 16 if len(records) % 2 else 8
        later = [first, first + 3.0] if batch == 16 else [first]
        records.append(
            dataclasses.replace(
                record(trial.trial_id, lr, later, batch=batch), params=trial.params | {"data.batch_size": batch}
            )
        )
    found = importance(study, records)
    assert found is not None and found.patches == 160 and found.shares["optimizer.lr"] > 0.8


def test_too_few_trials_or_a_flat_objective_give_no_importance(study):  # noqa: F811
    assert importance(study, trials(3)) is None
    assert importance(study, [record(f"{i}", 1e-3 * (i + 1), [29.0]) for i in range(6)]) is None


def test_values_past_the_range_as_pbt_perturbs_them_are_taken(study):  # noqa: F811
    found = importance(study, trials(8, lr_range=(5e-5, 2e-2)))  # the study's range: 1e-4..1e-2
    assert found is not None and set(found.shares) == set(study.search)
