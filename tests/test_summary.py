"""A finished sweep read back without Ray: summaries, the closing table, warnings, the results CSV and plots,
from trial records built by hand; and the `tune` command refusing a bad study before anything starts."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pandas as pd
import pytest

from sr_tune.cli import main
from sr_tune.study import load_study
from sr_tune.summary import (
    TrialRecord,
    edge_warnings,
    objective_metric,
    parent_description,
    results_csv,
    summarize,
    summary_figures,
    sweep_metrics,
    sweep_table,
    trial_description,
)

from .conftest import write_sweep_study as write_study

SEARCH = """
search:
  optimizer.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
  data.augment_strength: {type: uniform, low: 0.0, high: 1.0}
  data.batch_size: {type: choice, values: [8, 16]}
budget: {max_steps: 40}
"""


def record(trial_id: str, lr: float, psnrs: list[float], *, error: str | None = None, batch: int = 8) -> TrialRecord:
    """Trial ``t<trial_id>``, which reported ``psnrs`` every 20 steps at batch 8 (one worker), one checkpoint
    per report."""
    patches = [20 * 8 * (i + 1) for i in range(len(psnrs))]
    reports = pd.DataFrame(
        {
            "trial_id": trial_id,
            "val_psnr": psnrs,
            "psnr_gain": [p - 29.0 for p in psnrs],
            "loss": 0.01,
            "patches_seen": patches,
            "timestamp": range(len(psnrs)),
            "hp/optimizer.lr": lr,
        }
    )
    checkpoints = [(f"/ckpt/{trial_id}/{i}", {"val_psnr": p}) for i, p in enumerate(psnrs)]
    params = {"optimizer.lr": lr, "data.augment_strength": 0.5, "data.batch_size": batch}
    last = {"patches_seen": patches[-1]} if patches else {}
    latest = checkpoints[-1][0] if checkpoints else None
    return TrialRecord(
        trial_id=trial_id,
        name=f"t{trial_id}",
        params=params,
        last=last,
        run_id="r" if patches else None,
        patches_seen=patches[-1] if patches else 0,
        reports=reports,
        error=error,
        checkpoints=checkpoints,
        latest_checkpoint=latest,
    )


@pytest.fixture
def study(tmp_path: Path):
    return load_study(write_study(tmp_path, "name: summary\n" + SEARCH))


def test_trials_are_ranked_by_their_best_report_and_early_stops_are_told_apart(study):
    records = [
        record("a", 1e-3, [29.1]),
        record("b", 9.5e-3, [29.2, 29.6], batch=16),
        record("c", 2e-3, [29.5, 29.3]),
    ]
    summaries = summarize(study, records)
    assert [s.trial_id for s in summaries] == ["b", "c", "a"]
    assert summaries[0].best_checkpoint == "/ckpt/b/1" and summaries[1].best_checkpoint == "/ckpt/c/0"
    assert [s.latest_checkpoint for s in summaries] == ["/ckpt/b/1", "/ckpt/c/1", "/ckpt/a/0"]
    assert [s.stopped_early for s in summaries] == [False, False, True]  # a saw 160 of 320 patches
    # The parent carries the best trial's values under the trials' own names; a trial only its best objective.
    assert sweep_metrics(study, summaries[0].best) == pytest.approx(
        {"val_psnr": 29.6, "psnr_gain": 0.6, "loss": 0.01, "patches_seen": 320, "best_val_psnr": 29.6}
    )
    assert objective_metric(study, summaries[2].best) == {"best_val_psnr": 29.1}
    assert sweep_table(study, summaries).splitlines() == [
        "best 3 of 3 trial(s) of summary:",
        "rank trial     val_psnr  vs bicubic   patches       lr      aug       bs",
        "1    tb         29.6000    +0.60 dB       320   9.5e-3      0.5       16",
        "2    tc         29.5000    +0.50 dB       320   2.0e-3      0.5        8",
        "3    ta         29.1000    +0.10 dB       160   1.0e-3      0.5        8  stopped early",
    ]
    # A final run (the best values trained longer) closes the table, unranked.
    final = dataclasses.replace(
        summaries[0], trial_id="final", name="final", best={"val_psnr": 29.9, "psnr_gain": 0.9}, patches_seen=3200
    )
    assert sweep_table(study, summaries, top=1, final=final).splitlines()[2:] == [
        "1    tb         29.6000    +0.60 dB       320   9.5e-3      0.5       16",
        "     final      29.9000    +0.90 dB     3,200   9.5e-3      0.5       16  tb trained longer",
    ]
    assert edge_warnings(study, summaries[0]) == [
        "optimizer.lr = 0.0095 in the best trial lies near the high edge of its range (0.0001 .. 0.01); "
        "the optimum may be beyond 0.01"
    ]
    csv = pd.read_csv(io.StringIO(results_csv(study, summaries)))
    assert list(csv["trial"]) == ["tb", "tc", "ta"] and list(csv["best_val_psnr"]) == [29.6, 29.5, 29.1]

    figures = summary_figures(study, records, summaries)
    assert set(figures) == {
        "plots/best_so_far.png",
        "plots/param_optimizer.lr.png",
        "plots/param_data.augment_strength.png",
        "plots/param_data.batch_size.png",
    }
    line = figures["plots/best_so_far.png"].axes[0].lines[0]
    assert line.get_ydata()[-1] == pytest.approx(29.6) and line.get_xdata()[-1] == 160 + 320 + 320
    # Every trial is a point coloured by batch size, the early-stopped one hollow, the best one starred.
    axis = figures["plots/param_optimizer.lr.png"].axes[0]
    trials, star = axis.collections[:4], axis.collections[1]
    points = [tuple(c.get_offsets()[0]) for c in (trials[0], trials[2], trials[3])]
    assert points == [(9.5e-3, 29.6), (2e-3, 29.5), (1e-3, 29.1)]
    assert star.get_paths() and tuple(star.get_offsets()[0]) == (9.5e-3, 29.6) and star.get_facecolor()[0][2] == 0
    assert len(trials[3].get_facecolor()) == 0  # hollow: stopped early
    assert tuple(trials[0].get_edgecolor()[0]) != tuple(trials[2].get_edgecolor()[0])  # bs 16 vs bs 8
    labels = [text.get_text() for text in axis.get_legend().get_texts()]
    assert labels == ["data.batch_size = 8", "data.batch_size = 16", "stopped early", "best"]
    choice = figures["plots/param_data.batch_size.png"].axes[0]
    assert [tick.get_text() for tick in choice.get_xticklabels()] == ["8", "16"]


def test_the_parent_run_description_names_the_study_and_links_the_best_trial(study):
    summaries = summarize(study, [record("a", 1e-3, [29.1]), record("b", 9.5e-3, [29.2, 29.6])])
    text = parent_description(study, summaries, "7", {"a": "run-a", "b": "run-b"}, top=1)
    lines = text.splitlines()
    assert lines[0] == "## Sweep `summary`"
    assert "**Best: [tb lr=9.5e-3 aug=0.5 bs=8](#/experiments/7/runs/run-b)**: val_psnr 29.6000 (+0.60 dB" in text
    assert "| rank | trial | val_psnr | vs bicubic | patches | lr | aug | bs | |" in lines
    assert "| 1 | [tb](#/experiments/7/runs/run-b) | 29.6000 | +0.60 dB | 320 | 9.5e-3 | 0.5 | 8 |  |" in lines
    assert "1 more in `results.csv`." in lines
    assert lines[-1].startswith("`val_psnr`: PSNR-Y in dB averaged over the validation images (`sample`: centre")
    assert "The dB printed on the `grids/` images are of the one image each grid shows." in lines[-1]


def test_a_trial_describes_how_it_ended_and_what_its_numbers_are_measured_on(study):
    best = {"val_psnr": 29.61234, "psnr_gain": 0.6, "step": 40, "patches_seen": 320}
    text = trial_description(study, "t02", {"optimizer.lr": 2e-3}, best, stopped_early=True, error=None)
    assert text.splitlines()[:3] == [
        "## Trial t02 lr=2.0e-3 of sweep `summary`",
        "",
        "Best val_psnr **29.6123** (+0.60 dB vs bicubic) at step 40 (320 patches); it stopped early by the scheduler.",
    ]
    failed = trial_description(study, "t03", {}, {}, stopped_early=False, error="Traceback\nValueError: boom\n")
    assert "**Failed**: `ValueError: boom`" in failed and "Best" not in failed


def test_a_failed_trial_is_ranked_last_and_marked(study):
    summaries = summarize(study, [record("ok", 1e-3, [29.1]), record("bad", 1e-3, [], error="boom")])
    assert [s.trial_id for s in summaries] == ["ok", "bad"] and summaries[1].error == "boom"
    assert sweep_table(study, summaries).splitlines()[-1].endswith("  failed")


def test_a_bad_study_stops_the_tune_command_naming_the_file_and_key(tmp_path: Path, capsys):
    path = write_study(tmp_path, "name: bad\nsearch: {optimizer.lrr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}}")
    assert main(["tune", str(path)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "optimizer.lrr: unknown key" in error
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_a_searched_value_longer_than_the_column_widens_it_and_keeps_two_spaces_before_it(study):
    summaries = summarize(study, [record("a", 1e-3, [29.1], batch=123456789012), record("b", 2e-3, [29.0])])
    header, *rows = sweep_table(study, summaries).splitlines()[1:]
    assert header.endswith("      aug            bs")
    # The values end where their column's name ends: right-aligned under it.
    edge = header.index(" bs") + 3
    assert [row[edge - 14 : edge] for row in rows] == ["  123456789012", "             8"]


def test_a_delta_stn_sweep_shows_the_values_each_trial_learned_and_their_trajectories(study):
    records = [record("a", 1e-3, [29.1, 29.4]), record("b", 2e-3, [29.5, 29.3])]
    for rec, l2 in zip(records, ([3e-6, 1e-6], [2e-5, 4e-5])):
        rec.reports["hp_l2"], rec.reports["hp_l2_scale"] = l2, [0.5, 0.6]
    summaries = summarize(study, records)
    assert sweep_table(study, summaries).splitlines()[1:] == [  # at each trial's best report; no scales
        "rank trial     val_psnr  vs bicubic   patches       lr      aug       bs       l2",
        "1    tb         29.5000    +0.50 dB       320   2.0e-3      0.5        8   2.0e-5",
        "2    ta         29.4000    +0.40 dB       320   1.0e-3      0.5        8   1.0e-6",
    ]
    figure = summary_figures(study, records, summaries)["plots/delta_stn_l2.png"]
    assert "plots/delta_stn_l2_scale.png" not in summary_figures(study, records, summaries)
    assert sorted(list(line.get_ydata()) for line in figure.axes[0].lines) == [[3e-6, 1e-6], [2e-5, 4e-5]]
