"""Sweep pieces that need no Ray: edge-of-range warnings and the `tune` command refusing a bad study.
The sweeps themselves run in tests/test_ray.py."""

from __future__ import annotations

from pathlib import Path

from sr_tune.cli import main
from sr_tune.study import load_study
from sr_tune.sweep import TrialSummary, edge_warnings

from .conftest import write_sweep_study as write_study


def test_a_best_value_near_the_edge_of_its_range_is_warned_about(tmp_path: Path):
    study = load_study(
        write_study(
            tmp_path,
            """
name: edges
search:
  optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  data.augment_strength: {type: uniform, low: 0.0, high: 1.0}
  data.batch_size: {type: choice, values: [8, 16]}
""",
        )
    )
    best = TrialSummary(
        trial_id="t",
        params={"optimizer.lr": 9.5e-3, "data.augment_strength": 0.5, "data.batch_size": 8},
        best={},
        patches_seen=0,
        stopped_early=False,
        error=None,
        run_id=None,
        best_checkpoint=None,
    )
    warnings = edge_warnings(study, best)
    assert len(warnings) == 1 and warnings[0].startswith("optimizer.lr = 0.0095") and "high edge" in warnings[0]


def test_a_bad_study_stops_the_tune_command_naming_the_file_and_key(tmp_path: Path, capsys):
    path = write_study(tmp_path, "name: bad\nsearch: {optimizer.lrr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}")
    assert main(["tune", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "optimizer.lrr: unknown key" in error
