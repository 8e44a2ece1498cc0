"""Hyperparameter sweeps: a study file -> a Ray Tune ``Tuner`` whose trials each drive one Ray Train run.

Each Tune trial is a small driver function (``_trial``) that builds the ``TorchTrainer`` of
``distributed.build_trainer`` for the trial's config and relays every report to Tune *with its
checkpoint*: Ray's ``TuneReportCallback`` forwards only a ``checkpoint_path`` metric, so Tune would hold no
checkpoint, ``Result.checkpoint`` would be None and PBT would never exploit. Here a Train callback
(``_ReportBridge``) hands metrics and the persisted checkpoint to the driver, which reports both through
``ray.tune.report``; Tune copies the checkpoint into the trial's folder (keeping the best
``keep_checkpoints`` by the objective) before training goes on. A trial restored by Tune (a resumed
sweep, a PBT exploit) starts its Train run from ``ray.tune.get_checkpoint()``.

Search: Optuna (TPE multivariate, QMC, random, grid) under a concurrency limit, its study stored in an
SQLite file beside the MLflow store (``optuna-dashboard sqlite:///.../optuna.db``), with ASHA stopping
on the objective; or PBT (Ray refuses it with a search algorithm), which samples start points at random
and perturbs lr, L2, augmentation strength and loss weights. Time is counted in patches seen.

MLflow: one parent run per sweep, one nested run per trial (its rank-0 worker logs metrics and grids
there); at the end the parent gets the results table, plots, the best trial's params and metrics, and
the best model in the model registry.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train import CheckpointConfig
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from sr_tune.checkpoint import load_checkpoint
from sr_tune.config import TrainConfig
from sr_tune.distributed import build_trainer, init_ray, with_absolute_tracking_uri
from sr_tune.engine import EvalResult
from sr_tune.study import Distribution, Study
from sr_tune.tracking import (
    close_trial_run,
    end_run,
    log_sweep_summary,
    register_model,
    run_status,
    run_tags,
    start_parent_run,
    trial_run,
    trial_runs,
)

DRIVER_CPUS = 0.05  # a trial's driver only waits on its workers; they get the rest of the trial's CPUs


@dataclass(frozen=True)
class SweepPaths:
    root: Path  # Tune's storage: <training.output_dir>/sweeps
    experiment: Path  # root/<study>: Tune's trials, their checkpoints and the searcher's state
    train_storage: Path  # root/<study>.train: each trial's Ray Train runs
    runs: Path  # root/<study>.runs/<trial>: the engine's last/ and best/ folders
    state: Path  # root/<study>.json: the MLflow parent run, for --resume
    optuna_url: str  # the Optuna study's storage: beside a SQLite MLflow store, else in root


def sweep_paths(study: Study, base: TrainConfig) -> SweepPaths:
    root = Path(base.training.output_dir).resolve() / "sweeps"
    uri = base.tracking.tracking_uri  # resolved by the caller
    optuna_dir = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else root
    return SweepPaths(root=root, experiment=root / study.name, train_storage=root / f"{study.name}.train",
                      runs=root / f"{study.name}.runs", state=root / f"{study.name}.json",
                      optuna_url=f"sqlite:///{optuna_dir / 'optuna.db'}")  # fmt: skip


@dataclass(frozen=True)
class TrialContext:
    """What every trial driver needs besides its sampled params (passed through ``tune.with_parameters``)."""

    study: Study
    base: TrainConfig  # tracking URI made absolute
    paths: SweepPaths
    parent_run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


class _ReportBridge(UserCallback):
    """Runs in the Train controller: passes each rank-0 report and its persisted checkpoint to the trial
    driver. Rank 0 then waits at the report gate until the driver has reported to Tune (which copies the
    checkpoint) and Tune lets the trial go on, so Train deletes no checkpoint Tune has not taken."""

    def __init__(self, reports: Queue) -> None:
        self.reports = reports

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            self.reports.put(("report", metrics[0], checkpoint))
        except ray.exceptions.RayActorError:
            pass  # the scheduler stopped the trial: its driver, queues and this run are going away


def _train_run_name(trial_id: str, start: tune.Checkpoint | None) -> str:
    """No timestamps: a restarted driver with the same start point finds its Train run again. A new start
    point (a PBT exploit, a resumed sweep) is a new Train run."""
    if start is None:
        return trial_id
    return f"{trial_id}-from-{hashlib.sha1(start.path.encode()).hexdigest()[:10]}"


def _trial(params: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial: train ``params`` through Ray Train, relaying reports and checkpoints to Tune."""
    study, paths = context.study, context.paths
    trial_id = tune.get_context().get_trial_id()
    sampled = {d.key: params[d.key] for d in study.search}
    # The sweep's tracking settings, URI already resolved by the sweep process: resolving again here would
    # read this worker's environment, which need not be the user's.
    config = replace(study.trial_config(sampled),
                     tracking=replace(context.base.tracking, run_name=f"{study.name}-{trial_id}"))  # fmt: skip
    run_id = None
    if config.tracking.enabled and context.parent_run_id:
        run_id = trial_run(config, parent_run_id=context.parent_run_id, trial_id=trial_id,
                           name=f"{study.name}-{trial_id}", tags=context.tags)  # fmt: skip

    start = tune.get_checkpoint()
    reports = Queue(actor_options={"num_cpus": 0})  # Train controller -> driver: (kind, metrics, checkpoint)
    gate = Queue(actor_options={"num_cpus": 0})  # driver -> rank 0: Tune took the report, go on
    trainer = build_trainer(
        config, name=_train_run_name(trial_id, start), storage_path=str(paths.train_storage),
        loop_config={"checkpoint_dir": str(paths.runs / trial_id), "resume": False, "start_checkpoint": start,
                     "tags": context.tags, "parent_run_id": context.parent_run_id, "run_id": run_id,
                     "hyperparameters": sampled, "close_run": False, "quiet": True, "report_gate": gate},
        driver_cpus=DRIVER_CPUS, callbacks=[_ReportBridge(reports)],
        checkpoint_config=CheckpointConfig(num_to_keep=1),  # Tune keeps the trial's best; Train only the latest
    )  # fmt: skip

    def fit() -> None:
        try:
            trainer.fit()
            reports.put(("done", None, None))
        except BaseException as error:  # handed to the driver thread, which raises it in the trial
            reports.put(("error", error, None))

    threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True).start()
    while True:
        kind, payload, checkpoint = reports.get()
        if kind == "done":
            return
        if kind == "error":
            raise payload
        held = tune.Checkpoint(path=checkpoint.path, filesystem=checkpoint.filesystem) if checkpoint else None
        # Returns only once Tune has copied the checkpoint and its scheduler lets the trial continue; a
        # stopped or paused trial never gets here, and its workers find the gate gone.
        tune.report({**payload, "mlflow_run_id": run_id or ""}, checkpoint=held)
        gate.put(True)


def _trial_name(trial: Any) -> str:
    """Folder and display name: the trial id alone (Tune's default adds every param and a timestamp)."""
    return f"trial_{trial.trial_id}"


def _optuna_distribution(dist: Distribution) -> Any:
    import optuna

    if dist.kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(dist.values))
    if dist.kind == "int":
        return optuna.distributions.IntDistribution(int(dist.low), int(dist.high), step=int(dist.step or 1))
    return optuna.distributions.FloatDistribution(dist.low, dist.high, log=dist.kind == "loguniform",
                                                  step=dist.step if dist.kind == "uniform" else None)  # fmt: skip


def _tune_domain(dist: Distribution) -> Any:
    if dist.kind == "choice":
        return tune.choice(list(dist.values))
    if dist.kind == "int":
        return tune.qrandint(int(dist.low), int(dist.high), int(dist.step or 1))
    if dist.kind == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    return tune.quniform(dist.low, dist.high, dist.step) if dist.step else tune.uniform(dist.low, dist.high)


def _grid_size(study: Study) -> int:
    return math.prod(len(d.grid()) for d in study.search)


def _search(study: Study, paths: SweepPaths, max_concurrent: int) -> tuple[Any, Any, dict[str, Any], int]:
    """(search algorithm, scheduler, param space, num_samples) for the study."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    objective, settings, interval = study.objective, study.scheduler, study.eval_interval_steps()
    if settings.name == "pbt":
        space = {d.key: _tune_domain(d) for d in study.search}
        scheduler = PopulationBasedTraining(
            time_attr="patches_seen", perturbation_interval=study.patches(settings.perturbation_interval or interval),
            hyperparam_mutations=space, quantile_fraction=settings.quantile_fraction,
            resample_probability=settings.resample_probability, synch=settings.synch)  # fmt: skip
        return None, scheduler, space, study.budget.num_samples

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=study.sampler.seed, multivariate=True,
                                                  n_startup_trials=study.sampler.startup_trials),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=study.sampler.seed, scramble=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=study.sampler.seed),
        "grid": lambda: optuna.samplers.GridSampler({d.key: d.grid() for d in study.search}, seed=study.sampler.seed),
    }  # fmt: skip
    searcher = OptunaSearch(
        space={d.key: _optuna_distribution(d) for d in study.search}, metric=objective.metric, mode=objective.mode,
        sampler=samplers[study.sampler.name](), study_name=study.name,
        storage=optuna.storages.RDBStorage(paths.optuna_url))  # fmt: skip
    scheduler = FIFOScheduler()
    if settings.name == "asha":
        # max_t one patch past the budget: trials end by themselves at the budget (killing one there would cut
        # its Train run short); ASHA only stops trials early.
        scheduler = ASHAScheduler(time_attr="patches_seen", max_t=study.patches(study.budget.max_steps) + 1,
                                  grace_period=study.patches(settings.grace_period or interval),
                                  reduction_factor=settings.reduction_factor)  # fmt: skip
    num_samples = _grid_size(study) if study.sampler.name == "grid" else study.budget.num_samples
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent), scheduler, {}, num_samples


def max_concurrent_trials(study: Study) -> int:
    """The study's ``budget.max_concurrent``, else as many trials as the cluster's CPUs (and GPUs) hold when
    each takes ``workers * cpus_per_worker`` CPUs (the driver's share included)."""
    if study.budget.max_concurrent:
        return study.budget.max_concurrent
    resources, per_trial = ray.cluster_resources(), study.resources
    fits = int(resources.get("CPU", 1) // (per_trial.workers * per_trial.cpus_per_worker))
    if per_trial.gpus_per_worker:
        fits = min(fits, int(resources.get("GPU", 0) // (per_trial.workers * per_trial.gpus_per_worker)))
    if fits < 1:
        raise ValueError(f"one trial needs {per_trial.workers} worker(s) x {per_trial.cpus_per_worker} CPU "
                         f"(+ {per_trial.gpus_per_worker} GPU) but the cluster has {resources}")  # fmt: skip
    return fits


@dataclass(frozen=True)
class TrialSummary:
    trial_id: str
    params: dict[str, Any]  # the searched values (PBT: the last ones it switched to)
    best: dict[str, Any]  # metrics at the trial's best report by the objective
    patches_seen: int  # at its last report
    stopped_early: bool  # stopped by the scheduler before the budget
    error: str | None
    run_id: str | None
    best_checkpoint: str | None  # Tune's copy


@dataclass(frozen=True)
class SweepResult:
    study: Study
    trials: list[TrialSummary]  # best first
    parent_run_id: str | None
    model_version: str | None
    warnings: list[str]
    experiment: Path


def _best_row(frame: Any, metric: str, mode: str) -> dict[str, Any]:
    if frame is None or frame.empty or metric not in frame:
        return {}
    index = frame[metric].idxmax() if mode == "max" else frame[metric].idxmin()
    return frame.loc[index].to_dict()


def _summaries(study: Study, grid: Any) -> list[TrialSummary]:
    objective, budget = study.objective, study.patches(study.budget.max_steps)
    summaries = []
    for result in grid:
        frame = result.metrics_dataframe
        best = _best_row(frame, objective.metric, objective.mode)
        last = result.metrics or {}
        ranked = _ranked_checkpoints(study, result)
        best_checkpoint = ranked[0].path if ranked else None
        patches = int(last.get("patches_seen", 0))
        summaries.append(TrialSummary(
            trial_id=last.get("trial_id") or Path(result.path).name, params={d.key: result.config[d.key] for d in study.search},
            best=best, patches_seen=patches, stopped_early=result.error is None and 0 < patches < budget,
            error=str(result.error) if result.error else None, run_id=last.get("mlflow_run_id") or None,
            best_checkpoint=best_checkpoint))  # fmt: skip
    sign = -1 if objective.mode == "max" else 1
    return sorted(summaries, key=lambda s: sign * s.best.get(objective.metric, -sign * math.inf))


def _ranked_checkpoints(study: Study, result: Any) -> list[tune.Checkpoint]:
    """The trial's checkpoints that Tune holds, best first by the objective."""
    metric = study.objective.metric
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    scored.sort(key=lambda item: item[1][metric], reverse=study.objective.mode == "max")
    return [checkpoint for checkpoint, _ in scored]


def _prune_checkpoints(study: Study, grid: Any) -> None:
    """Keep each trial's best ``keep_checkpoints`` by the objective, and its latest."""
    for result in grid:
        ranked = _ranked_checkpoints(study, result)
        kept = {c.path for c in ranked[: study.keep_checkpoints]} | ({result.checkpoint.path} if result.checkpoint else set())
        for checkpoint in ranked[study.keep_checkpoints :]:
            if checkpoint.path not in kept:
                shutil.rmtree(checkpoint.path, ignore_errors=True)


def edge_warnings(study: Study, best: TrialSummary) -> list[str]:
    """A line per searched parameter whose best value lies in the outer 10% of its range."""
    warnings = []
    for dist in study.search:
        side = dist.edge(best.params[dist.key])
        if side:
            bound = dist.low if side == "low" else dist.high
            warnings.append(f"{dist.key} = {best.params[dist.key]:.4g} in the best trial lies near the {side} edge "
                            f"of its range ({dist.low:g} .. {dist.high:g}); the optimum may be beyond {bound:g}")  # fmt: skip
    return warnings


def _close_runs(study: Study, base: TrainConfig, parent_run_id: str, summaries: list[TrialSummary]) -> None:
    """End every nested run with its curves, best checkpoint and how the trial ended."""
    runs = trial_runs(base, parent_run_id)
    for summary in summaries:
        run = runs.get(summary.trial_id)
        if run is None or run.info.status != "RUNNING":
            continue
        history = []
        if summary.best_checkpoint:
            history = [EvalResult(**entry) for entry in load_checkpoint(summary.best_checkpoint).state["history"]]
        close_trial_run(base, run.info.run_id, history=history, best_checkpoint=summary.best_checkpoint,
                        failed=summary.error is not None,
                        tags={"sr_tune.stopped_early": str(summary.stopped_early).lower(),
                              "sr_tune.patches_seen": str(summary.patches_seen)})  # fmt: skip


def _summary_artifacts(study: Study, grid: Any, summaries: list[TrialSummary]) -> tuple[dict[str, str], dict[str, Any]]:
    """The results table (CSV) and the plots."""
    import pandas as pd

    from sr_tune.visualize import best_so_far_figure, parameter_figure, schedule_figure

    metric, mode = study.objective.metric, study.objective.mode
    rows = [{"trial_id": s.trial_id, **{f"param.{k}": v for k, v in s.params.items()},
             f"best_{metric}": s.best.get(metric), "psnr_gain": s.best.get("psnr_gain"),
             "patches_seen": s.patches_seen, "stopped_early": s.stopped_early, "error": s.error or "",
             "mlflow_run_id": s.run_id or ""} for s in summaries]  # fmt: skip
    files = {"results.csv": pd.DataFrame(rows).to_csv(index=False)}

    frames = [r.metrics_dataframe for r in grid if r.metrics_dataframe is not None and metric in r.metrics_dataframe]
    reports = pd.concat(frames).sort_values("timestamp", kind="stable") if frames else pd.DataFrame()
    figures = {}
    if not reports.empty:
        # Patches the sweep has trained on when each report came: each report adds what its trial trained since
        # its previous one (a PBT restart from another trial's checkpoint counts only the new patches).
        steps = reports.groupby("trial_id")["patches_seen"].diff().fillna(reports["patches_seen"]).clip(lower=0)
        figures["plots/best_so_far.png"] = best_so_far_figure(list(zip(steps.cumsum(), reports[metric])), metric, mode)
    scored = [s for s in summaries if metric in s.best]
    for dist in study.search:
        if dist.kind != "choice":
            figures[f"plots/param_{dist.key}.png"] = parameter_figure(
                dist.key, [s.params[dist.key] for s in scored], [s.best[metric] for s in scored], metric,
                log=dist.kind == "loguniform")  # fmt: skip
    if study.scheduler.name == "pbt" and not reports.empty:
        for dist in study.search:
            column = f"hp/{dist.key}"
            if column in reports:
                schedules = {trial: list(zip(group["patches_seen"], group[column]))
                             for trial, group in reports.groupby("trial_id")}  # fmt: skip
                figures[f"plots/pbt_schedule_{dist.key}.png"] = schedule_figure(dist.key, schedules)
    return files, figures


def run_sweep(study: Study, *, resume: bool = False, tags: dict[str, str] | None = None) -> SweepResult:
    """Run (or with ``resume``, continue) ``study`` on the Ray cluster (``RAY_ADDRESS``) or a local Ray."""
    base = with_absolute_tracking_uri(study.base_config())
    paths = sweep_paths(study, base)
    init_ray()
    restoring = resume and tune.Tuner.can_restore(str(paths.experiment))
    if not restoring and paths.experiment.exists():
        raise FileExistsError(f"{paths.experiment} holds an earlier sweep of study {study.name!r}: add --resume to "
                              f"continue it, or remove that folder to start over")  # fmt: skip
    tags = {**run_tags(str(study.path)), **(tags or {}), "sr_tune.study": study.name}
    tracking = base.tracking.enabled
    if restoring:
        parent_run_id = json.loads(paths.state.read_text())["parent_run_id"]
    else:
        parent_run_id = None
        if tracking:
            parent_run_id = start_parent_run(base, name=f"sweep-{study.name}", tags=tags, params={
                "study": study.name, "sampler": study.sampler.name, "scheduler": study.scheduler.name,
                "objective": f"{study.objective.mode} {study.objective.metric}",
                "num_samples": study.budget.num_samples, "max_steps": study.budget.max_steps,
                "workers_per_trial": study.resources.workers, "base_config": str(study.base),
                **{f"fixed.{key}": value for key, value in study.fixed.items()}},
                files={f"search_space/{study.path.name}": study.text})  # fmt: skip
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.state.write_text(json.dumps({"parent_run_id": parent_run_id, "study": str(study.path)}))

    context = TrialContext(study=study, base=base, paths=paths, parent_run_id=parent_run_id, tags=tags)
    trainable = tune.with_resources(tune.with_parameters(_trial, context=context), {"CPU": DRIVER_CPUS})
    if restoring:
        tuner = tune.Tuner.restore(str(paths.experiment), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)  # fmt: skip
    else:
        concurrent = max_concurrent_trials(study)
        search_alg, scheduler, param_space, num_samples = _search(study, paths, concurrent)
        objective = study.objective
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=objective.metric, mode=objective.mode, search_alg=search_alg, scheduler=scheduler,
                num_samples=num_samples, time_budget_s=study.budget.time_limit_s or None,
                max_concurrent_trials=None if search_alg else concurrent,  # else the searcher's limiter caps it
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name=study.name, storage_path=str(paths.root), verbose=1,
                # PBT clones a trial from whatever checkpoint it had when the decision was made, and the
                # clone restores seconds later: nothing may be deleted meanwhile. Pruned after the sweep.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=None if study.scheduler.name == "pbt" else study.keep_checkpoints,
                    checkpoint_score_attribute=objective.metric, checkpoint_score_order=objective.mode),
                failure_config=tune.FailureConfig(max_failures=base.distributed.max_failures)),
        )  # fmt: skip
    grid = tuner.fit()

    summaries = _summaries(study, grid)
    if study.scheduler.name == "pbt":
        _prune_checkpoints(study, grid)
    scored = [s for s in summaries if study.objective.metric in s.best]
    warnings = edge_warnings(study, scored[0]) if scored else []
    version = None
    # A finished sweep resumed again (a second `make run`) only shows its results: nothing is logged twice.
    if tracking and parent_run_id and run_status(base, parent_run_id) != "FINISHED":
        _close_runs(study, base, parent_run_id, summaries)
        files, figures = _summary_artifacts(study, grid, summaries)
        best = scored[0] if scored else None
        if warnings:
            files["warnings.txt"] = "\n".join(warnings) + "\n"
        log_sweep_summary(
            base, parent_run_id,
            params={f"best.{key}": value for key, value in best.params.items()} if best else {},
            metrics={f"best_{key}": float(value) for key, value in (best.best if best else {}).items()
                     if key in ("val_psnr", "val_ssim", "psnr_gain", "bicubic_psnr", "loss", "patches_seen")
                     or key.startswith("val_vgg")},
            files=files, figures=figures,
            tags={"sr_tune.best_trial": best.trial_id if best else "", "sr_tune.edge_warnings": str(len(warnings))},
        )  # fmt: skip
        if best and best.best_checkpoint:
            model = load_checkpoint(best.best_checkpoint).build_model()
            version = register_model(base, parent_run_id, model, registered_name=f"sr_tune-{study.name}")
        end_run(base, parent_run_id)
    return SweepResult(study=study, trials=summaries, parent_run_id=parent_run_id, model_version=version,
                       warnings=warnings, experiment=paths.experiment)  # fmt: skip
