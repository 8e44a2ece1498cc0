"""Hyperparameter sweeps: a study file -> a Ray Tune ``Tuner`` whose trials each train one config.

A trial of one CPU worker runs ``distributed.run_loop`` in its own process and reports to Tune directly (Ray
Train would start five more processes for it). Any other trial (``_trial``) is a small driver that builds the
``TorchTrainer`` of ``distributed.build_trainer`` for the trial's config and relays every report to Tune
*with its checkpoint*: Ray's ``TuneReportCallback`` forwards only a ``checkpoint_path`` metric, so Tune
would hold no checkpoint, ``Result.checkpoint`` would be None and PBT would never exploit. Here a Train
callback (``_ReportBridge``) hands metrics and the persisted checkpoint to the driver, which reports both
through ``ray.tune.report``; Tune copies the checkpoint into the trial's folder (keeping the best
``keep_checkpoints`` by the objective) before training goes on. A trial restored by Tune (a resumed sweep,
a PBT exploit) starts from ``ray.tune.get_checkpoint()``.

At the end of a sweep on a local Ray, once every trial has started and none waits, the CPUs of the trials
that ended go to the ones still training in their own processes (``CpuShares`` in the driver writes each
one's share, ``ThreadShare`` reads it in the trial, the engine sets torch's threads between steps).

Search: Optuna (TPE multivariate, QMC, random, grid) under a concurrency limit, its study stored with the
sweep (``<root>/<study>/optuna.db`` on a local root, ``optuna-dashboard sqlite:///.../optuna.db``), so that a
sweep started over (``--restart``) starts its searcher over too; with ASHA stopping
on the objective; or PBT (Ray refuses it with a search algorithm), which samples start points at random
and perturbs lr, L2, augmentation strength and loss weights. Time is counted in patches seen.

Storage: everything the sweep keeps (Tune's experiment, each trial's Train runs and checkpoints, the state
``--resume`` reads) lives under one root (``storage.Storage``): a folder, or a ``pyarrow.fs`` URI every node
reaches, handed to Ray as a URI so that each node opens it with its own credentials.

MLflow: one parent run per sweep, one nested run per trial, named after the trial and its values
(``t03 lr=2.1e-3 wd=3.8e-5 bs=16``). Its rank-0 worker logs metrics and grids there, and the driver's
``_SweepCallback`` ends it the moment Tune stops or finishes the trial, with its curves, best checkpoint
and ``best_*`` metrics. At the end the parent gets the best trial's values under the trials' own keys, a
markdown description with the top trials, the results table, plots, and the best model in the registry
(alias ``best``). The same callback feeds the console's ``SweepView``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from mlflow import MlflowClient
from ray import tune
from ray.train import CheckpointConfig
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from sr_tune.checkpoint import load_checkpoint
from sr_tune.console import SweepView, trial_label
from sr_tune.distributed import WorkerOptions, build_trainer, init_ray, run_loop
from sr_tune.engine import EvalResult
from sr_tune.storage import STORAGE_ENV, Storage, scratch_dir
from sr_tune.study import Distribution, Study
from sr_tune.summary import (
    TrialRecord,
    TrialSummary,
    best_metrics,
    edge_warnings,
    parent_description,
    ranked_checkpoints,
    results_csv,
    summarize,
    summary_figures,
)
from sr_tune.tracking import (
    TRIAL_TAG,
    close_run,
    find_trial_run,
    flatten,
    log_model,
    log_summary,
    prepare_model_logging,
    register_best,
    run_tags,
    start_run,
    trial_runs,
)

DRIVER_CPUS = 0.05  # a trial's driver only waits on its workers; they get the rest of the trial's CPUs


@dataclass(frozen=True)
class SweepPaths:
    storage: Storage  # the storage root: --storage, SR_TUNE_STORAGE, the study's storage, else <output_dir>/sweeps
    experiment: str  # URI of root/<study>: Tune's trials, their checkpoints and the searcher's state
    train_storage: str  # URI of root/<study>.train: each trial's Ray Train runs
    state: str  # root/<study>.json on the storage: the MLflow parent run, for --resume
    runs: Path  # the engine's working last/ and best/ folders: root/<study>.runs, or node-local scratch
    log: Path  # Ray's and Tune's own output when the console shows the sweep's view: root/<study>.log, or scratch
    optuna_url: str | None  # the Optuna study's storage, in the sweep's own folder on a local root; None with
    # remote storage (an in-memory study, saved with Tune's searcher state on that storage)


def storage_root(study: Study, storage: str | None = None) -> Storage:
    """The sweep's storage root: ``storage`` (``--storage``), else ``SR_TUNE_STORAGE``, else the study's
    ``storage``, else ``<training.output_dir>/sweeps``."""
    chosen = storage or os.environ.get(STORAGE_ENV) or study.storage
    return Storage.at(chosen or str(Path(study.base_config().training.output_dir) / "sweeps"))


def sweep_paths(study: Study, tracking_uri: str | None, storage: str | None = None) -> SweepPaths:
    root = storage_root(study, storage)
    # Remote storage: resumable from any machine, so nothing machine-local.
    optuna_url = None if root.remote else f"sqlite:///{Path(root.uri) / study.name / 'optuna.db'}"
    local = scratch_dir(hashlib.sha1(root.uri.encode()).hexdigest()[:10]) if root.remote else Path(root.uri)
    return SweepPaths(
        storage=root,
        experiment=root.uri_of(study.name),
        train_storage=root.uri_of(f"{study.name}.train"),
        state=root.path_of(f"{study.name}.json"),
        runs=local / f"{study.name}.runs",
        log=local / f"{study.name}.log",
        optuna_url=optuna_url,
    )


@dataclass(frozen=True)
class TrialContext:
    """What every trial driver needs besides its sampled params (passed through ``tune.with_parameters``)."""

    study: Study
    paths: SweepPaths
    tracking_uri: str | None  # resolved by the sweep process; None = not tracked
    parent_run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    share_cpus: bool = False  # the driver hands the CPUs of ended trials to the last ones (``CpuShares``)


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


def _trial_run_id(context: TrialContext, trial_id: str, name: str, config: Any, sampled: dict[str, Any]) -> str | None:
    """The trial's nested MLflow run: found again when the trial ran before (a resumed sweep, a PBT restart),
    else created with the trial's config as params, named ``t03 lr=2.1e-3 ...``."""
    if context.tracking_uri is None or context.parent_run_id is None:
        return None
    client, experiment = MlflowClient(context.tracking_uri), config.tracking.experiment
    found = find_trial_run(client, experiment, context.parent_run_id, trial_id)
    if found and client.get_run(found).info.status == "KILLED":
        client.update_run(found, status="RUNNING")  # its sweep was stopped, and now goes on
    return found or start_run(
        client,
        experiment,
        name=trial_label(name, sampled),
        tags={**context.tags, TRIAL_TAG: trial_id, "sr_tune.trial": name},
        params=flatten(config.to_dict()),
        parent_run_id=context.parent_run_id,
    )


def _trial(params: dict[str, Any], context: TrialContext) -> None:
    """One Tune trial: train ``params`` (in this process, or through Ray Train over several workers) and
    report each evaluation and checkpoint to Tune."""
    study, paths = context.study, context.paths
    trial_id, name = tune.get_context().get_trial_id(), tune.get_context().get_trial_name()
    sampled = {key: params[key] for key in study.search}
    config = study.trial_config(sampled)
    config = replace(config, tracking=replace(config.tracking, run_name=f"{study.name}-{trial_id}"))
    run_id = _trial_run_id(context, trial_id, name, config, sampled)
    numeric = {key: float(value) for key, value in sampled.items() if isinstance(value, (int, float))}

    start = tune.get_checkpoint()
    options = WorkerOptions(
        config=config,
        checkpoint_dir=str(paths.runs / trial_id),
        start_checkpoint=start,
        tracking_uri=context.tracking_uri,
        run_id=run_id,
        # Only PBT changes values inside a trial; elsewhere they are params, and a flat hp/* curve says nothing.
        hyperparameters=numeric if study.scheduler.name == "pbt" else {},
        close_run=False,
        quiet=True,
    )
    tagged = {"mlflow_run_id": run_id or "", "trial_name": name}
    if runs_in_trial(study):
        own = _own_threads(study)
        share = ThreadShare(CpuShares.file(paths.runs, trial_id), own) if context.share_cpus else None
        _train_in_trial(options, tagged, own, share)
    else:
        _train_on_workers(options, tagged, trial_id, storage_path=paths.train_storage)


def runs_in_trial(study: Study) -> bool:
    """A trial of one CPU worker trains in the trial's own process: Ray Train would start a controller, a
    worker and their helpers (five more processes, two of them importing torch) for no parallelism."""
    return study.resources.workers == 1 and not study.resources.gpus_per_worker


def _trial_resources(study: Study) -> dict[str, float]:
    if runs_in_trial(study):
        return {"CPU": study.resources.cpus_per_worker}
    return {"CPU": DRIVER_CPUS}  # the driver only waits on its Train workers, which get the rest


def _trainable(study: Study, context: TrialContext) -> Any:
    """What Tune runs for each trial: ``_trial`` with the sweep's context, asking for the trial's CPUs."""
    return tune.with_resources(tune.with_parameters(_trial, context=context), _trial_resources(study))


def _own_threads(study: Study) -> int:
    return max(1, int(study.resources.cpus_per_worker))


def _train_in_trial(options: WorkerOptions, tagged: dict[str, str], own: int, share: ThreadShare | None) -> None:
    """``run_loop`` in this process, reporting straight to Tune: ``tune.report`` returns only when Tune lets
    the trial go on, so a stopped trial ends inside it, having logged nothing Tune did not see. It trains on
    ``own`` threads (its Ray CPUs) until ``share`` says more."""
    # Set, not inherited: a reused process may come from a trial given more, and a user's OMP_NUM_THREADS
    # would win over the one Ray sets from the trial's CPUs.
    torch.set_num_threads(own)

    def send(metrics: dict[str, Any], checkpoint: Path | None) -> bool:
        held = tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        tune.report({**metrics, **tagged}, checkpoint=held)  # Tune copies the checkpoint into the trial's folder
        return False

    start = options.start_checkpoint
    run_loop(options, rank=0, world_size=1, device=torch.device("cpu"), start=start, send=send, threads=share)


class ThreadShare:
    """In a trial that trains in its own process: how many CPU threads its sweep's driver lets it use, from the
    file ``CpuShares`` writes, read at most twice a second (asking on every step costs a clock read)."""

    def __init__(self, path: Path, own: int) -> None:
        self.path, self.own, self.threads, self.next_read = path, own, own, 0.0

    def __call__(self) -> int:
        now = time.monotonic()
        if now >= self.next_read:
            self.next_read = now + 0.5
            try:
                self.threads = int(self.path.read_text())
            except FileNotFoundError:
                self.threads = self.own
        return self.threads


class CpuShares:
    """In the sweep's driver, for trials that train in processes on this machine: once every trial has started
    and none waits, the CPUs of the trials that ended go to the running ones, so that the last trials of a
    sweep train on the slots the others left idle instead of one slot each; a trial that waits again (a
    retry, a PBT exploit) takes them back. Each running trial's share is written to its file in ``folder``.

    Threads change a run's float sums: a trial that ends a sweep on more threads is not bit-for-bit the run
    it would be on its own CPUs (its patches and schedule are)."""

    def __init__(self, folder: Path, study: Study, slots: int) -> None:
        self.folder, self.study = folder, study
        self.own, self.cpus = _own_threads(study), int(slots * study.resources.cpus_per_worker)
        self.granted: dict[str, int] = {}

    @staticmethod
    def file(folder: Path, trial_id: str) -> Path:
        return folder / f"{trial_id}.threads"

    def clear(self) -> None:
        """Removes the shares written (a resumed sweep starts with every trial on its own CPUs)."""
        for stale in self.folder.glob("*.threads"):
            stale.unlink(missing_ok=True)

    def update(self, trials: list[Any], ended: str | None = None) -> dict[str, int]:
        """Writes the share of each running trial (``ended`` is on its way out); returns those that changed."""
        running = [trial.trial_id for trial in trials if trial.status == "RUNNING" and trial.trial_id != ended]
        share = self.own
        if running and _none_left_to_start(self.study, trials):
            share = max(self.own, self.cpus // len(running))
        changed = {}
        for trial_id in running:
            if self.granted.get(trial_id, self.own) != share:
                self.folder.mkdir(parents=True, exist_ok=True)
                partial = self.folder / f".{trial_id}.threads"
                partial.write_text(str(share))
                partial.replace(self.file(self.folder, trial_id))  # the trial reads a whole number or none
                self.granted[trial_id] = changed[trial_id] = share
        return changed


def _none_left_to_start(study: Study, trials: list[Any]) -> bool:
    """Every trial of the sweep has started and none waits for a slot: slots freed from now on stay idle."""
    waiting = any(trial.status in ("PENDING", "PAUSED") for trial in trials)
    return not waiting and len(trials) >= num_trials(study)


def _train_on_workers(options: WorkerOptions, tagged: dict[str, str], trial_id: str, storage_path: str) -> None:
    """A Ray Train run over the trial's workers, whose every report (and persisted checkpoint) this driver
    relays to Tune; rank 0 waits at the report gate until Tune has taken it."""
    start = options.start_checkpoint
    reports = Queue(actor_options={"num_cpus": 0})  # Train controller -> driver: (kind, metrics, checkpoint)
    gate = Queue(actor_options={"num_cpus": 0})  # driver -> rank 0: Tune took the report, go on
    trainer = build_trainer(
        replace(options, report_gate=gate),
        name=_train_run_name(trial_id, start),
        storage_path=storage_path,
        driver_cpus=DRIVER_CPUS,
        callbacks=[_ReportBridge(reports)],
        checkpoint_config=CheckpointConfig(num_to_keep=1),  # Tune keeps the trial's best; Train only the latest
    )

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
        tune.report({**payload, **tagged}, checkpoint=held)
        gate.put(True)


def _trial_dirname(trial: Any) -> str:
    """The trial's folder: its id alone (Tune's default adds every param and a timestamp)."""
    return f"trial_{trial.trial_id}"


def _trial_namer(study: Study) -> Callable[[Any], str]:
    """Tune's display name for a trial, ``t03``: its number in the sweep, which leads Tune's experiment tag
    (counted from 1 by the search algorithm's generator, from 0 by PBT's variant generator) and survives a
    resumed sweep."""
    first = 0 if study.scheduler.name == "pbt" else 1

    def name(trial: Any) -> str:
        return f"t{int(trial.experiment_tag.split('_')[0]) + 1 - first:02d}"

    return name


def _optuna_distribution(dist: Distribution) -> Any:
    import optuna

    if dist.type == "choice":
        return optuna.distributions.CategoricalDistribution(list(dist.values))
    if dist.type == "int":
        return optuna.distributions.IntDistribution(int(dist.low), int(dist.high), step=int(dist.step or 1))
    step = dist.step if dist.type == "uniform" else None
    return optuna.distributions.FloatDistribution(dist.low, dist.high, log=dist.type == "loguniform", step=step)


def _tune_domain(dist: Distribution) -> Any:
    if dist.type == "choice":
        return tune.choice(list(dist.values))
    if dist.type == "int":
        return tune.qrandint(int(dist.low), int(dist.high), int(dist.step or 1))
    if dist.type == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    return tune.quniform(dist.low, dist.high, dist.step) if dist.step else tune.uniform(dist.low, dist.high)


def _search(study: Study, paths: SweepPaths, max_concurrent: int) -> tuple[Any, Any, dict[str, Any], int]:
    """(search algorithm, scheduler, param space, num_samples) for the study."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    objective, settings, interval = study.objective, study.scheduler, study.eval_interval_steps()
    if settings.name == "pbt":
        space = {key: _tune_domain(dist) for key, dist in study.search.items()}
        scheduler = PopulationBasedTraining(
            time_attr="patches_seen",
            perturbation_interval=study.patches(settings.perturbation_interval or interval),
            hyperparam_mutations=space,
            quantile_fraction=settings.quantile_fraction,
            resample_probability=settings.resample_probability,
            synch=settings.synch,
        )
        return None, scheduler, space, num_trials(study)

    seed = study.sampler.seed
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(
            seed=seed, multivariate=True, n_startup_trials=study.sampler.startup_trials
        ),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, scramble=True),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "grid": lambda: optuna.samplers.GridSampler({k: d.grid() for k, d in study.search.items()}, seed=seed),
    }
    searcher = OptunaSearch(
        space={key: _optuna_distribution(dist) for key, dist in study.search.items()},
        metric=objective.metric,
        mode=objective.mode,
        sampler=samplers[study.sampler.name](),
        study_name=study.name,
        storage=_optuna_storage(paths.optuna_url) if paths.optuna_url else None,
    )
    scheduler = FIFOScheduler()
    if settings.name == "asha":
        # max_t one patch past the budget: trials end by themselves at the budget (killing one there would cut
        # its Train run short); ASHA only stops trials early.
        scheduler = ASHAScheduler(
            time_attr="patches_seen",
            max_t=study.patches(study.budget.max_steps) + 1,
            grace_period=study.patches(settings.grace_period or interval),
            reduction_factor=settings.reduction_factor,
        )
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent), scheduler, {}, num_trials(study)


def num_trials(study: Study) -> int:
    """How many trials the sweep runs: every point of a grid, else the budget's ``num_samples``."""
    if study.sampler.name == "grid":
        return math.prod(len(dist.grid()) for dist in study.search.values())
    return study.budget.num_samples


def _optuna_storage(url: str) -> Any:
    import optuna

    Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)  # the sweep's own folder
    return optuna.storages.RDBStorage(url)


def _written_by_a_sweep(storage: Storage, state: str, experiment: str) -> bool:
    if storage.exists(state):
        try:
            return "parent_run_id" in json.loads(storage.read_text(state))
        except (ValueError, TypeError):
            return False
    top = [path.rsplit("/", 1) for path in storage.list_files(experiment)]
    return any(
        folder.rstrip("/") == experiment.rstrip("/") and (name == "optuna.db" or name.startswith("experiment_state"))
        for folder, name in top
    )


def remove_sweep(study: Study, paths: SweepPaths) -> list[str]:
    """``--restart``: what sr_tune wrote for the study's earlier sweep under its storage root (Tune's
    experiment with the Optuna study, the Train runs, the state ``--resume`` reads, the working checkpoints and
    the log) removed; its MLflow runs stay. Returns what was removed.

    Only a sweep sr_tune wrote is removed: its state file (the parent run's id) or, when a sweep was stopped
    before writing it, Tune's experiment state or the Optuna study in ``<root>/<study>``. Anything else under
    those names (a user's own folder in a ``--storage`` root) raises ``FileExistsError`` and nothing goes."""
    storage = paths.storage
    experiment = storage.path_of(study.name)
    sweep_dirs = (experiment, storage.path_of(f"{study.name}.train"))
    held = any(storage.exists(path) for path in (*sweep_dirs, paths.state)) or paths.runs.exists()
    if (held or paths.log.exists()) and not _written_by_a_sweep(storage, paths.state, experiment):
        raise FileExistsError(
            f"{storage.uri} holds files named after study {study.name!r} that are not a sweep sr_tune wrote (no "
            f"{study.name}.json, no Tune or Optuna state): --restart removes nothing; move them, or use another "
            f"--storage"
        )
    removed = []
    for path in sweep_dirs:
        if storage.exists(path):
            storage.delete_dir(path)
            removed.append(path)
    if storage.exists(paths.state):
        storage.filesystem.delete_file(paths.state)
        removed.append(paths.state)
    if paths.runs.is_dir():
        shutil.rmtree(paths.runs)
        removed.append(str(paths.runs))
    if paths.log.is_file():
        paths.log.unlink()
        removed.append(str(paths.log))
    return removed


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
        cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
        raise ValueError(
            f"resources: one trial asks for {per_trial.workers} worker(s) x {per_trial.cpus_per_worker:g} CPU(s) "
            f"and {per_trial.gpus_per_worker:g} GPU(s) each, and the cluster has {cpus:g} CPU(s) and {gpus:g} "
            f"GPU(s) in all: lower them with overrides, e.g. resources.cpus_per_worker="
            f"{max(int(cpus // per_trial.workers), 1)}"
        )
    return fits


@dataclass(frozen=True)
class SweepResult:
    study: Study
    trials: list[TrialSummary]  # best first
    parent_run_id: str | None
    model_version: str | None
    warnings: list[str]
    experiment: str  # the URI (local: the path) of Tune's experiment
    unfinished: int = 0  # trials a stop signal (Ctrl-C, SIGTERM) left running: continue with ``resume``


def _record(study: Study, result: Any) -> TrialRecord:
    """A Ray Tune ``Result`` as the typed record the summaries read."""
    last = dict(result.metrics or {})
    trial_id = last.get("trial_id") or Path(result.path).name.removeprefix("trial_")
    return TrialRecord(
        trial_id=trial_id,
        name=last.get("trial_name") or trial_id,
        params={key: result.config[key] for key in study.search},
        last=last,
        reports=result.metrics_dataframe,
        error=str(result.error) if result.error else None,
        checkpoints=[(checkpoint.path, metrics) for checkpoint, metrics in (result.best_checkpoints or [])],
        latest_checkpoint=result.checkpoint.path if result.checkpoint else None,
    )


def _prune_checkpoints(study: Study, storage: Storage, records: list[TrialRecord]) -> None:
    """Keep each trial's best ``keep_checkpoints`` by the objective, and its latest."""
    for record in records:
        ranked = ranked_checkpoints(study, record)
        kept = {*ranked[: study.keep_checkpoints], record.latest_checkpoint}
        for path in ranked[study.keep_checkpoints :]:
            if path not in kept:
                storage.delete_dir(path)


def _close_trial_run(
    client: MlflowClient,
    study: Study,
    storage: Storage,
    run_id: str,
    *,
    best: dict[str, Any],
    best_checkpoint: str | None,
    latest_checkpoint: str | None,
    patches_seen: int,
    stopped_early: bool,
    error: str | None,
) -> None:
    """End a trial's nested run: curves from its latest checkpoint's history, its best checkpoint, its best
    metrics under the parent's ``best_*`` keys (one runs-table column for both) and how it ended."""
    history = []
    if latest_checkpoint:
        with storage.local_copy(latest_checkpoint) as folder:
            history = [EvalResult(**entry) for entry in load_checkpoint(folder).state["history"]]
    tags = {"sr_tune.stopped_early": str(stopped_early).lower(), "sr_tune.patches_seen": str(patches_seen)}
    if error:
        tags["sr_tune.error"] = error[-4000:]  # MLflow tag values hold 8000 characters
    with ExitStack() as stack:
        best_folder = stack.enter_context(storage.local_copy(best_checkpoint)) if best_checkpoint else None
        close_run(
            client,
            run_id,
            history=history,
            best_checkpoint=best_folder,
            metrics=best_metrics(study, best),
            tags=tags,
            failed=error is not None,
        )


def _error_line(trial: Any) -> str:
    """The last line of the trial's error file: the exception that ended it."""
    path = Path(trial.error_file) if trial.error_file else None
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path and path.is_file() else []
    return lines[-1].strip() if lines else "failed (Tune recorded no error)"


class _SweepCallback(tune.Callback):
    """In the sweep's driver: keeps the console view current, and ends each trial's MLflow run the moment
    Tune stops or finishes the trial, so the run's end time (and duration) is the trial's. Runs are closed
    (curves drawn, checkpoint uploaded) on a thread of their own: Tune's loop, which starts the next trial
    and lets running ones past their report gate, does not wait for it. When a trial ends with none left to
    start, that thread also prepares the best model's export in the slot left idle, and ``shares`` (when given)
    hands the running trials the CPUs of the ended ones."""

    def __init__(
        self,
        study: Study,
        storage: Storage,
        view: SweepView | None,
        client: MlflowClient | None,
        parent_run_id: str | None,
        shares: CpuShares | None = None,
    ) -> None:
        self.study, self.storage, self.view = study, storage, view
        self.client, self.parent_run_id, self.shares = client, parent_run_id, shares
        self.closing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="close-trial-run")
        self.closed: list[Future] = []
        self.unfinished: list[str] = []  # trial ids a stop signal (Ctrl-C, SIGTERM) left unfinished
        self.running: list[str] = []
        self.tune_sigint: Any = None  # the SIGINT handler Tune installs for its loop
        self.export_prepared = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config, callbacks included, into the experiment; a resumed sweep sets fresh ones.
        return {"study": self.study}

    def wait(self) -> None:
        """Until every trial run whose trial has ended is closed; raises what closing one raised."""
        self.closing.shutdown(wait=True)
        for future in self.closed:
            future.result()

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.view is not None:
            self.view.started(trial.trial_id, str(trial), {key: trial.config.get(key) for key in self.study.search})
        self._share_cpus(trials)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        if self.view is not None:
            self.view.reported(trial.trial_id, result)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.running = [trial.trial_id for trial in trials if not trial.is_finished()]
        if self.view is not None:
            self.view.tick()

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self.tune_sigint is None:
            self.tune_sigint = signal.getsignal(signal.SIGINT)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # A stop signal ends Tune's loop, which then puts back the SIGINT handler it replaced; its cleanup has
        # stopped the trials by now, so the ones unfinished are those running at the last step.
        if self.tune_sigint is not None and signal.getsignal(signal.SIGINT) is not self.tune_sigint:
            self.unfinished = self.running

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, None)
        self._share_cpus(trials, ended=trial.trial_id)
        self._prepare_export(trials)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, _error_line(trial))
        self._share_cpus(trials, ended=trial.trial_id)
        self._prepare_export(trials)

    def _share_cpus(self, trials: list[Any], ended: str | None = None) -> None:
        """New CPU shares go to the trials at once; their runs get a ``cpu_threads`` point on the closing thread."""
        if self.shares is None:
            return
        changed = self.shares.update(trials, ended)
        if self.client is None or self.parent_run_id is None:
            return
        for trial in trials:
            if trial.trial_id in changed:
                self.closed.append(
                    self.closing.submit(self._log_threads, trial.trial_id, changed[trial.trial_id], trial.last_result)
                )

    def _log_threads(self, trial_id: str, threads: int, last: dict[str, Any]) -> None:
        run_id = find_trial_run(self.client, self.study.base_config().tracking.experiment, self.parent_run_id, trial_id)
        if run_id is not None:
            self.client.log_metric(run_id, "cpu_threads", threads, step=int(last.get("step", 0)))

    def _prepare_export(self, trials: list[Any]) -> None:
        """Every trial has started and none waits for the slot this one freed: it stays idle until the sweep
        ends, so the export's warm-up (5 s of imports on 2 CPUs) runs there instead of after the last trial."""
        if self.client is None or self.export_prepared or not _none_left_to_start(self.study, trials):
            return
        self.export_prepared = True
        # Not among ``closed``: should it fail, the export fails where the model is logged, with its context.
        self.closing.submit(prepare_model_logging, self.study.base_config().in_channels)

    def _ended(self, trial: Any, error: str | None) -> None:
        patches = int(trial.last_result.get("patches_seen", 0))
        stopped = error is None and 0 < patches < self.study.patches(self.study.budget.max_steps)
        if self.view is not None:
            self.view.ended(trial.trial_id, "failed" if error else "stopped" if stopped else "done", error)
        if self.client is None or self.parent_run_id is None:
            return
        experiment = self.study.base_config().tracking.experiment
        run_id = find_trial_run(self.client, experiment, self.parent_run_id, trial.trial_id)
        if run_id is None:  # failed before its driver created the run
            return
        best = trial.run_metadata.checkpoint_manager.best_checkpoint_result  # by the objective, Tune's copy
        self.closed.append(
            self.closing.submit(
                _close_trial_run,
                self.client,
                self.study,
                self.storage,
                run_id,
                best=best.metrics if best else {},
                best_checkpoint=best.checkpoint.path if best else None,
                latest_checkpoint=trial.checkpoint.path if trial.checkpoint else None,
                patches_seen=patches,
                stopped_early=stopped,
                error=error,
            )
        )


def _open_parent_run(study: Study, paths: SweepPaths, client: MlflowClient | None, tags: dict[str, str]) -> str | None:
    """Step 1: the sweep's MLflow parent run (study settings as params, the study file as an artifact), and
    the state file ``--resume`` reads it back from."""
    parent_run_id = None
    if client is not None:
        params = {
            "study": study.name,
            "sampler": study.sampler.name,
            "scheduler": study.scheduler.name,
            "objective": f"{study.objective.mode} {study.objective.metric}",
            "num_samples": study.budget.num_samples,
            "max_steps": study.budget.max_steps,
            "workers_per_trial": study.resources.workers,
            "base_config": str(study.base_path),
            **{f"fixed.{key}": value for key, value in study.fixed.items()},
        }
        parent_run_id = start_run(
            client, study.base_config().tracking.experiment, name=f"sweep-{study.name}", tags=tags, params=params
        )
        client.log_text(parent_run_id, study.text, f"search_space/{study.path.name}")
    state = {"parent_run_id": parent_run_id, "study": str(study.path), "overrides": list(study.overrides)}
    paths.storage.write_text(paths.state, json.dumps(state))
    return parent_run_id


def _fit_tuner(
    study: Study, paths: SweepPaths, context: TrialContext, callback: _SweepCallback, restoring: bool
) -> list[TrialRecord]:
    """Step 2: build Tune's ``Tuner`` (or restore the interrupted one) and run every trial."""
    if restoring:
        tuner = tune.Tuner.restore(
            paths.experiment, trainable=_trainable(study, context), resume_unfinished=True, resume_errored=True
        )
        # The restored run config holds the pickled (emptied) callback of the first run: this run's replaces it.
        tuner._local_tuner.get_run_config().callbacks = [callback]
    else:
        tuner = new_tuner(study, paths, context, [callback])
    return [_record(study, result) for result in tuner.fit()]


def new_tuner(
    study: Study,
    paths: SweepPaths,
    context: TrialContext,
    callbacks: list[tune.Callback],
    *,
    stop: tune.Stopper | None = None,
) -> tune.Tuner:
    """Tune's ``Tuner`` for a new sweep of ``study``: its searcher and scheduler, a trial per sampled config.
    ``stop`` (e.g. a budget over all trials) serves benchmarks."""
    concurrent = max_concurrent_trials(study)
    search_alg, scheduler, param_space, num_samples = _search(study, paths, concurrent)
    objective = study.objective
    return tune.Tuner(
        _trainable(study, context),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=objective.metric,
            mode=objective.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            time_budget_s=study.budget.time_limit_s or None,
            max_concurrent_trials=None if search_alg else concurrent,  # else the searcher's limiter caps it
            trial_name_creator=_trial_namer(study),
            trial_dirname_creator=_trial_dirname,
            # On the local Ray a new trial takes over an ended trial's process (Python, torch and sr_tune already
            # imported: about 4 s a trial on 2 cores). Not on a cluster, where Tune then packed a sweep's trials
            # onto the node whose process it reused instead of spreading them.
            reuse_actors=not os.environ.get("RAY_ADDRESS"),
        ),
        run_config=tune.RunConfig(
            name=study.name,
            storage_path=paths.storage.uri,
            verbose=1,
            callbacks=callbacks,
            stop=stop,
            # PBT clones a trial from whatever checkpoint it had when the decision was made, and the
            # clone restores seconds later: nothing may be deleted meanwhile. Pruned after the sweep.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=None if study.scheduler.name == "pbt" else study.keep_checkpoints,
                checkpoint_score_attribute=objective.metric,
                checkpoint_score_order=objective.mode,
            ),
            failure_config=tune.FailureConfig(max_failures=study.base_config().distributed.max_failures),
        ),
    )


def _publish(
    study: Study,
    storage: Storage,
    client: MlflowClient,
    parent_run_id: str,
    records: list[TrialRecord],
    summaries: list[TrialSummary],
    warnings: list[str],
) -> str | None:
    """Step 3: end the trials' runs still open (a trial of an interrupted run), then the parent's summary: the
    best trial's values under the trials' own keys, its markdown description, the results table and plots;
    and the best model in the registry. Returns its version."""
    experiment = study.base_config().tracking.experiment
    runs = trial_runs(client, experiment, parent_run_id)
    for summary in summaries:
        run = runs.get(summary.trial_id)
        if run is not None and run.info.status == "RUNNING":
            _close_trial_run(
                client,
                study,
                storage,
                run.info.run_id,
                best=summary.best,
                best_checkpoint=summary.best_checkpoint,
                latest_checkpoint=summary.latest_checkpoint,
                patches_seen=summary.patches_seen,
                stopped_early=summary.stopped_early,
                error=summary.error,
            )
    scored = [s for s in summaries if study.objective.metric in s.best]
    best = scored[0] if scored else None
    best_run = runs.get(best.trial_id) if best else None
    files = {"results.csv": results_csv(study, summaries)}
    if warnings:
        files["warnings.txt"] = "\n".join(warnings) + "\n"
    tags = {"sr_tune.edge_warnings": str(len(warnings))}
    if best is not None:
        tags.update({"sr_tune.best_trial": best.name, "sr_tune.best_trial_id": best.trial_id})
    if best_run is not None:
        tags["sr_tune.best_run_id"] = best_run.info.run_id
        client.set_tag(best_run.info.run_id, "sr_tune.best", "true")
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    run_ids = {trial_id: run.info.run_id for trial_id, run in runs.items()}
    log_summary(
        client,
        parent_run_id,
        params=best.params if best else {},
        metrics=best_metrics(study, best.best) if best else {},
        files=files,
        figures=summary_figures(study, records, summaries),
        tags={**tags, "mlflow.note.content": parent_description(study, summaries, experiment_id, run_ids)},
    )
    version = None
    if best and best.best_checkpoint:
        with storage.local_copy(best.best_checkpoint) as folder:
            checkpoint = load_checkpoint(folder)
            model = checkpoint.build_model()  # reads the weights: while the (downloaded) folder is there
        registered_name = f"sr_tune-{study.name}"
        version = log_model(
            client,
            parent_run_id,
            model,
            name="best_model",
            in_channels=checkpoint.config.in_channels,
            registered_name=registered_name,
        )
        value = best.best[study.objective.metric]
        register_best(
            client,
            registered_name,
            version,
            description=(
                f"Best trial {best.name} of sweep {study.name}: {checkpoint.config.model.name} "
                f"x{checkpoint.config.model.scale} ({checkpoint.config.data.color}), "
                f"{study.objective.metric} {value:.4f} at step {checkpoint.step}."
            ),
            tags={
                "study": study.name,
                "trial": best.name,
                "trial_id": best.trial_id,
                "scale": str(checkpoint.config.model.scale),
                study.objective.metric: f"{value:.4f}",
            },
        )
    # A sweep none of whose trials reported the objective failed, whatever Tune thinks of it.
    client.set_terminated(parent_run_id, status="FINISHED" if best else "FAILED")
    return version


def _mark_killed(client: MlflowClient, study: Study, parent_run_id: str) -> None:
    """A stopped sweep's parent and its trials' runs still open are KILLED; a resume sets them running."""
    for run in trial_runs(client, study.base_config().tracking.experiment, parent_run_id).values():
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(parent_run_id, status="KILLED")


def _check_storage(study: Study, paths: SweepPaths, resume: bool) -> bool:
    """Before anything starts: whether there is a sweep to restore. Raises when the storage does not answer,
    or holds an earlier sweep of the study and ``resume`` is not set (Tune would overwrite its state)."""
    try:
        exists = paths.storage.exists(paths.storage.path_of(study.name))
        restoring = resume and tune.Tuner.can_restore(paths.experiment)
    except OSError as error:
        raise ConnectionError(f"cannot reach the sweep's storage {paths.storage.uri}: {error}") from None
    if restoring and paths.storage.exists(paths.state):
        started = json.loads(paths.storage.read_text(paths.state)).get("overrides", [])
        if started != list(study.overrides):
            raise ValueError(
                f"the sweep of study {study.name!r} was started with the overrides {shlex.join(started) or '(none)'}; "
                f"--resume continues it with the same ones (given: {shlex.join(study.overrides) or '(none)'})"
            )
    if exists and not restoring:
        raise FileExistsError(
            f"{paths.experiment} holds an earlier sweep of study {study.name!r}: add --resume to continue it, or "
            f"--restart to remove it and start over (its MLflow runs stay)"
        )
    return restoring


def run_sweep(
    study: Study,
    *,
    tracking_uri: str | None = None,
    resume: bool = False,
    tags: dict[str, str] | None = None,
    view: SweepView | None = None,
    storage: str | None = None,
) -> SweepResult:
    """Run (or with ``resume``, continue) ``study`` on the Ray cluster (``RAY_ADDRESS``) or a local Ray,
    logging to the MLflow store at ``tracking_uri`` (None: not tracked) and showing its trials on ``view``."""
    paths = sweep_paths(study, tracking_uri, storage)
    restoring = _check_storage(study, paths, resume)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="open-tracking") as pool:
        # A new SQLite store runs its schema migrations (3 s on 2 CPUs) while the local Ray starts (5 s).
        opening = pool.submit(lambda: MlflowClient(tracking_uri) if tracking_uri else None)
        init_ray(dashboard=not runs_in_trial(study))
        client = opening.result()
    max_concurrent_trials(study)  # a trial the cluster cannot hold is refused before the parent run exists
    tags = {**run_tags(str(study.path)), **(tags or {}), "sr_tune.study": study.name}
    if restoring:
        parent_run_id = json.loads(paths.storage.read_text(paths.state))["parent_run_id"]
        if client and parent_run_id and client.get_run(parent_run_id).info.status == "KILLED":
            client.update_run(parent_run_id, status="RUNNING")  # a stopped sweep goes on
    else:
        parent_run_id = _open_parent_run(study, paths, client, tags)
    shares = None
    if runs_in_trial(study) and not os.environ.get("RAY_ADDRESS"):  # the trials' processes share this machine
        shares = CpuShares(paths.runs, study, max_concurrent_trials(study))
        shares.clear()
    context = TrialContext(
        study=study,
        paths=paths,
        tracking_uri=client.tracking_uri if client else None,
        parent_run_id=parent_run_id,
        tags=tags,
        share_cpus=shares is not None,
    )
    callback = _SweepCallback(study, paths.storage, view, client, parent_run_id, shares)
    try:
        records = _fit_tuner(study, paths, context, callback, restoring)
    finally:
        callback.wait()
        if shares is not None:
            shares.clear()

    if callback.unfinished:  # stopped by a signal: the state is saved, nothing is summarized yet
        if client and parent_run_id:
            _mark_killed(client, study, parent_run_id)
        return SweepResult(study, [], parent_run_id, None, [], paths.experiment, len(callback.unfinished))
    summaries = summarize(study, records)
    if view is not None:
        for summary in summaries:  # counts the trials that had ended before a resume
            status = "failed" if summary.error else "stopped" if summary.stopped_early else "done"
            view.restored(summary.trial_id, summary.name, summary.params, status, summary.best)
    if study.scheduler.name == "pbt":
        _prune_checkpoints(study, paths.storage, records)
    scored = [s for s in summaries if study.objective.metric in s.best]
    warnings = edge_warnings(study, scored[0]) if scored else []
    version = None
    # A finished sweep resumed again (a second `make run`) only shows its results: nothing is logged twice.
    if client and parent_run_id and client.get_run(parent_run_id).info.status != "FINISHED":
        version = _publish(study, paths.storage, client, parent_run_id, records, summaries, warnings)
    return SweepResult(
        study=study,
        trials=summaries,
        parent_run_id=parent_run_id,
        model_version=version,
        warnings=warnings,
        experiment=paths.experiment,
    )
