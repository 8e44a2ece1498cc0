"""A finished sweep read back: per-trial summaries, the closing table, edge warnings, the results CSV and
plots. No Ray here: ``sweep.driver`` turns Tune's results into ``TrialRecord``s, and everything below is
tested on records built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sr_tune.console import format_value, short_name, trial_label
from sr_tune.results import TrialProgress, learned_columns, metric_names
from sr_tune.study import Study


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """What Tune kept of one trial."""

    trial_id: str
    name: str  # t03: its number in the sweep
    params: dict[str, Any]  # the searched values (PBT: the last ones it switched to)
    last: dict[str, Any]  # the metrics of its last report
    run_id: str | None = None  # its nested MLflow run
    patches_seen: int = 0  # at its last report (0: it never reported)
    reports: pd.DataFrame | None = field(default=None, compare=False)  # one row per report, Tune's columns
    error: str | None = None
    checkpoints: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (path, metrics) Tune holds
    latest_checkpoint: str | None = None


@dataclass(frozen=True, kw_only=True)
class TrialSummary:
    trial_id: str
    name: str
    params: dict[str, Any]
    best: dict[str, Any]  # metrics at the trial's best report by the objective
    patches_seen: int  # at its last report
    stopped_early: bool  # stopped by the scheduler before the budget
    error: str | None
    run_id: str | None
    best_checkpoint: str | None  # Tune's copy
    latest_checkpoint: str | None


def best_first(study: Study, checkpoints: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """(path, metrics) of the checkpoints that report the objective, best first by it."""
    metric = study.objective.metric
    scored = [(path, metrics) for path, metrics in checkpoints if metric in metrics]
    return sorted(scored, key=lambda item: item[1][metric], reverse=study.objective.mode == "max")


def ranked_checkpoints(study: Study, record: TrialRecord) -> list[str]:
    """The trial's checkpoints that Tune holds, best first by the objective."""
    return [path for path, _ in best_first(study, record.checkpoints)]


def _best_row(frame: pd.DataFrame | None, metric: str, mode: str) -> dict[str, Any]:
    if frame is None or frame.empty or metric not in frame:
        return {}
    index = frame[metric].idxmax() if mode == "max" else frame[metric].idxmin()
    return frame.loc[index].to_dict()


def summarize(study: Study, records: list[TrialRecord]) -> list[TrialSummary]:
    """One summary per trial, best first by the objective (trials without it last)."""
    objective = study.objective
    summaries = []
    for record in records:
        ranked = ranked_checkpoints(study, record)
        summaries.append(
            TrialSummary(
                trial_id=record.trial_id,
                name=record.name,
                params=record.params,
                best=_best_row(record.reports, objective.metric, objective.mode),
                patches_seen=record.patches_seen,
                stopped_early=study.stopped_early(record.patches_seen, failed=record.error is not None),
                error=record.error,
                run_id=record.run_id,
                best_checkpoint=ranked[0] if ranked else None,
                latest_checkpoint=record.latest_checkpoint,
            )
        )
    sign = -1 if objective.mode == "max" else 1
    return sorted(summaries, key=lambda s: (objective.metric not in s.best, sign * s.best.get(objective.metric, 0)))


def objective_metric(study: Study, best: dict[str, Any]) -> dict[str, float]:
    """``best_<objective>`` of a trial's best report ``best``: the one summary metric a trial's run carries,
    and its parent's too (one runs-table column ranks them all)."""
    metric = study.objective.metric
    return {f"best_{metric}": float(best[metric])} if metric in best else {}


def sweep_metrics(study: Study, best: dict[str, Any]) -> dict[str, float]:
    """A sweep's parent run metrics: the best trial's best report under the keys its trials log (``val_psnr``,
    ``psnr_gain``, ...: the same runs-table columns) and ``best_<objective>``."""
    names = (*metric_names(study.base_config.loss), "patches_seen")
    return {**{key: float(value) for key, value in best.items() if key in names}, **objective_metric(study, best)}


def measured_on(study: Study) -> str:
    """What the runs' PSNR numbers are measured on, in words (markdown)."""
    data, scale = study.base_config.data, study.base_config.model.scale
    crop = f"centre crops of {data.val_crop} px" if data.val_crop else "whole images"
    rounding = ", outputs rounded to 8 bits" if data.quantize_lr else ""
    return (
        f"`val_psnr`: PSNR-Y in dB averaged over the validation images (`{data.val}`: {crop}, a {scale}-pixel "
        f"border cut{rounding}); `psnr_gain`: the same minus bicubic's. The dB printed on the `grids/` images are "
        f"of the one image each grid shows."
    )


def trial_description(
    study: Study, name: str, params: dict[str, Any], best: dict[str, Any], *, stopped_early: bool, error: str | None
) -> str:
    """A trial's run description (markdown): how it ended, its best evaluation, and what the numbers mean."""
    metric = study.objective.metric
    lines = [f"## Trial {trial_label(name, params)} of sweep `{study.name}`", ""]
    if error:
        lines += [f"**Failed**: `{error.strip().splitlines()[-1]}`", ""]
    if metric in best:
        gain = f" ({best['psnr_gain']:+.2f} dB vs bicubic)" if "psnr_gain" in best else ""
        ended = "stopped early by the scheduler" if stopped_early else "ran its whole budget"
        progress = TrialProgress.of(best)
        lines += [
            f"Best {metric} **{best[metric]:.4f}**{gain} at step {progress.step} "
            f"({progress.patches_seen:,} patches); it {ended}.",
            "",
        ]
    return "\n".join([*lines, measured_on(study)]) + "\n"


def edge_warnings(study: Study, best: TrialSummary) -> list[str]:
    """A line per searched parameter whose best value lies in the outer 10% of its range."""
    warnings = []
    for key, dist in study.search.items():
        side = dist.edge(best.params[key])
        if side:
            bound = dist.low if side == "low" else dist.high
            warnings.append(
                f"{key} = {best.params[key]:.4g} in the best trial lies near the {side} edge of its range "
                f"({dist.low:g} .. {dist.high:g}); the optimum may be beyond {bound:g}"
            )
    return warnings


def results_csv(study: Study, summaries: list[TrialSummary]) -> str:
    metric = study.objective.metric
    rows = [
        {
            "trial": s.name,
            "trial_id": s.trial_id,
            **{f"param.{k}": v for k, v in s.params.items()},
            f"best_{metric}": s.best.get(metric),
            "psnr_gain": s.best.get("psnr_gain"),
            "patches_seen": s.patches_seen,
            "stopped_early": s.stopped_early,
            "error": s.error or "",
            "mlflow_run_id": s.run_id or "",
        }
        for s in summaries
    ]
    return pd.DataFrame(rows).to_csv(index=False)


def summary_figures(study: Study, records: list[TrialRecord], summaries: list[TrialSummary]) -> dict[str, Any]:
    """Best-so-far against the patches the sweep trained on; each searched parameter against the objective
    (the best trial starred, early-stopped trials hollow, coloured by the first choice parameter); and PBT's
    schedules."""
    from sr_tune.visualize import TrialPoint, best_so_far_figure, parameter_figure, schedule_figure

    metric = study.objective.metric
    frames = [r.reports for r in records if r.reports is not None and metric in r.reports]
    reports = pd.concat(frames).sort_values("timestamp", kind="stable") if frames else pd.DataFrame()
    figures = {}
    if not reports.empty:
        # Patches the sweep has trained on when each report came: each report adds what its trial trained since
        # its previous one (a PBT restart from another trial's checkpoint counts only the new patches).
        steps = reports.groupby("trial_id")["patches_seen"].diff().fillna(reports["patches_seen"]).clip(lower=0)
        figures["plots/best_so_far.png"] = best_so_far_figure(
            list(zip(steps.cumsum(), reports[metric])), metric, study.objective.mode
        )
    scored = [s for s in summaries if metric in s.best]
    group = next((key for key, dist in study.search.items() if dist.type == "choice"), None)
    for key, dist in study.search.items():
        points = [
            TrialPoint(
                name=s.name,
                value=s.params[key],
                objective=s.best[metric],
                group=s.params[group] if group else None,
                best=index == 0,
                stopped=s.stopped_early,
            )
            for index, s in enumerate(scored)
        ]
        figures[f"plots/param_{key}.png"] = parameter_figure(key, points, metric, kind=dist.type, group_key=group)
    if study.scheduler.name == "pbt" and not reports.empty:
        for key in study.search:
            if f"hp/{key}" in reports:
                schedules = {
                    trial: list(zip(group["patches_seen"], group[f"hp/{key}"]))
                    for trial, group in reports.groupby("trial_id")
                }
                figures[f"plots/pbt_schedule_{key}.png"] = schedule_figure(key, schedules)
    for column in learned_columns(reports.columns if not reports.empty else ()):  # Delta-STN trajectories
        schedules = {
            trial: list(zip(group["patches_seen"], group[column])) for trial, group in reports.groupby("trial_id")
        }
        figures[f"plots/delta_stn_{column.removeprefix('hp_')}.png"] = schedule_figure(column, schedules)
    return figures


def _row(study: Study, summary: TrialSummary, learned: list[str]) -> tuple[str, str, str, list[str], str]:
    """(objective, gain, patches, searched values then ``learned`` ones, how it ended) of one trial, as text."""
    metric = study.objective.metric
    value, gain = summary.best.get(metric), summary.best.get("psnr_gain")
    status = "stopped early" if summary.stopped_early else ("failed" if summary.error else "")
    found = [format_value(summary.best[key]) if key in summary.best else "-" for key in learned]
    return (
        f"{value:.4f}" if value is not None else "-",
        f"{gain:+.2f} dB" if gain is not None else "-",
        f"{summary.patches_seen:,}",
        [format_value(summary.params[key]) for key in study.search] + found,
        status,
    )


def sweep_table(study: Study, summaries: list[TrialSummary], top: int = 5, final: TrialSummary | None = None) -> str:
    """The best trials: objective, PSNR gain over bicubic, data seen, the searched values and those Delta-STN
    learned inside each run (at its best report); then the ``final`` run (the best values trained longer) when
    there is one."""
    metric = study.objective.metric
    learned = learned_columns(key for summary in summaries[:1] for key in summary.best)
    rows = [(str(rank), trial.name, *_row(study, trial, learned)) for rank, trial in enumerate(summaries[:top], 1)]
    if final is not None:
        value, gain, patches, values, status = _row(study, final, learned)
        rows.append(("", final.name, value, gain, patches, values, status or f"{summaries[0].name} trained longer"))
    names = [short_name(key) for key in study.search] + [key.removeprefix("hp_") for key in learned]
    # Each searched column at least two spaces wider than its name and its longest value (num_blocks, charbonnier).
    widths = [max(9, 2 + len(name), *(2 + len(row[5][i]) for row in rows)) for i, name in enumerate(names)]
    columns = "".join(f"{name:>{width}}" for name, width in zip(names, widths))
    header = f"{'rank':<5}{'trial':<7}{metric:>11}{'vs bicubic':>12}{'patches':>10}{columns}"
    lines = [f"best {min(top, len(summaries))} of {len(summaries)} trial(s) of {study.name}:", header]
    for rank, name, value, gain, patches, values, status in rows:
        searched = "".join(f"{v:>{width}}" for v, width in zip(values, widths))
        lines.append(f"{rank:<5}{name:<7}{value:>11}{gain:>12}{patches:>10}{searched}  {status}".rstrip())
    return "\n".join(lines)


def parent_description(
    study: Study,
    summaries: list[TrialSummary],
    experiment_id: str,
    run_ids: dict[str, str],
    top: int = 10,
    importance: str = "",
) -> str:
    """The sweep's parent run description (markdown, shown on its MLflow page): the study, the best trial
    linked to its run, the top trials, ``importance`` (markdown: which hyperparameters mattered) and what the
    numbers are measured on."""

    def link(summary: TrialSummary, text: str) -> str:
        run_id = run_ids.get(summary.trial_id)
        return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})" if run_id else text

    metric, budget = study.objective.metric, study.budget
    lines = [f"## Sweep `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        f"{study.sampler.name} sampler, {study.scheduler.name} scheduler; {budget.num_samples} trial(s) of up to "
        f"{budget.max_steps} steps ({study.patches(budget.max_steps):,} patches); objective: "
        f"{study.objective.mode} `{metric}`.",
        "",
    ]
    scored = [s for s in summaries if metric in s.best]
    if scored:
        best = scored[0]
        value, gain, patches, _, _ = _row(study, best, [])
        label = trial_label(best.name, best.params)
        lines += [f"**Best: {link(best, label)}**: {metric} {value} ({gain} vs bicubic) after {patches} patches.", ""]
    else:
        lines += ["**No trial reported the objective.**", ""]
    learned = learned_columns(key for summary in summaries[:1] for key in summary.best)
    keys = [short_name(key) for key in study.search] + [key.removeprefix("hp_") for key in learned]
    lines += [
        "| rank | trial | " + " | ".join([metric, "vs bicubic", "patches", *keys]) + " | |",
        "|" + "---|" * (6 + len(keys)),
    ]
    for rank, summary in enumerate(summaries[:top], 1):
        value, gain, patches, values, status = _row(study, summary, learned)
        cells = [str(rank), link(summary, summary.name), value, gain, patches, *values, status]
        lines.append("| " + " | ".join(cells) + " |")
    if len(summaries) > top:
        lines += ["", f"{len(summaries) - top} more in `results.csv`."]
    if importance:
        lines += ["", importance.rstrip()]
    return "\n".join([*lines, "", measured_on(study)]) + "\n"
