"""What runs inside a trial's process.

A trial of one CPU worker runs ``distributed.run_loop`` in its own process and reports to Tune directly (Ray
Train would start five more processes for it). Any other trial is a small driver that builds the
``TorchTrainer`` of ``distributed.build_trainer`` for the trial's config and relays every report to Tune
*with its checkpoint*: Ray's ``TuneReportCallback`` forwards only a ``checkpoint_path`` metric, so Tune
would hold no checkpoint, ``Result.checkpoint`` would be None and PBT would never exploit. Here a Train
callback (``_ReportBridge``) hands metrics and the persisted checkpoint to the driver, which reports both
through ``ray.tune.report``; Tune copies the checkpoint into the trial's folder (keeping the best
``keep_checkpoints`` by the objective) before training goes on. A trial restored by Tune (a resumed sweep,
a PBT exploit) starts from ``ray.tune.get_checkpoint()``.

Nothing here imports the driver's side (console view, summaries, pandas): a trial process loads only this.
"""

from __future__ import annotations

import hashlib
import threading
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

from sr_tune.console import trial_label
from sr_tune.distributed import ReportGate, WorkerOptions, build_trainer, run_loop
from sr_tune.engine import resolve_device
from sr_tune.study import Study
from sr_tune.sweep.cpu_shares import CpuShares, ThreadShare, own_threads
from sr_tune.sweep.layout import SweepPaths
from sr_tune.sweep.search import DRIVER_CPUS, runs_in_trial, trial_resources
from sr_tune.tracking import TRIAL_TAG, find_trial_run, flatten, start_run


@dataclass(frozen=True)
class TrialContext:
    """What every trial driver needs besides its sampled params (passed through ``tune.with_parameters``)."""

    study: Study
    paths: SweepPaths
    tracking_uri: str | None  # resolved by the sweep process; None = not tracked
    parent_run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    share_cpus: bool = False  # the driver hands the CPUs of ended trials to the last ones (``CpuShares``)


@dataclass(frozen=True)
class TrialTags:
    """What each report of a trial carries besides its metrics, read back by the driver from Tune's results."""

    trial_name: str  # t03
    mlflow_run_id: str | None  # the trial's nested run; None when the sweep is not tracked

    def as_metrics(self) -> dict[str, str]:
        return {"trial_name": self.trial_name, "mlflow_run_id": self.mlflow_run_id or ""}

    @classmethod
    def of(cls, metrics: dict[str, Any]) -> TrialTags | None:
        """The tags of a trial's last report; None for a trial that never reported."""
        if "trial_name" not in metrics:
            return None
        return cls(str(metrics["trial_name"]), str(metrics["mlflow_run_id"]) or None)


@dataclass(frozen=True)
class Reported:
    """Train controller -> trial driver: rank 0 reported ``metrics`` with this persisted checkpoint."""

    metrics: dict[str, Any]
    checkpoint: ray.train.Checkpoint | None


@dataclass(frozen=True)
class Finished:
    """The Train run ended: every report has been relayed."""


@dataclass(frozen=True)
class Failed:
    """The Train run raised ``error``: the driver raises it in the trial."""

    error: BaseException


class _ReportBridge(UserCallback):
    """Runs in the Train controller: passes each rank-0 report and its persisted checkpoint to the trial
    driver. Rank 0 then waits at the report gate until the driver has reported to Tune (which copies the
    checkpoint) and Tune lets the trial go on, so Train deletes no checkpoint Tune has not taken."""

    def __init__(self, reports: Queue) -> None:
        self.reports = reports

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            self.reports.put(Reported(metrics[0], checkpoint))
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
    tags = TrialTags(trial_name=name, mlflow_run_id=run_id)
    if runs_in_trial(study):
        own = own_threads(study)
        share = ThreadShare(CpuShares.file(paths.runs, trial_id), own) if context.share_cpus else None
        _train_in_trial(options, tags, own, share)
    else:
        _train_on_workers(options, tags, trial_id, storage_path=paths.train_storage)


def trainable(study: Study, context: TrialContext) -> Any:
    """What Tune runs for each trial: ``_trial`` with the sweep's context, asking for the trial's CPUs."""
    return tune.with_resources(tune.with_parameters(_trial, context=context), trial_resources(study))


def _train_in_trial(options: WorkerOptions, tags: TrialTags, own: int, share: ThreadShare | None) -> None:
    """``run_loop`` in this process (on its share of a GPU, if it has one), reporting straight to Tune:
    ``tune.report`` returns only when Tune lets the trial go on, so a stopped trial ends inside it, having
    logged nothing Tune did not see. It trains on ``own`` threads (its Ray CPUs) until ``share`` says more."""
    # Set, not inherited: a reused process may come from a trial given more, and a user's OMP_NUM_THREADS
    # would win over the one Ray sets from the trial's CPUs.
    torch.set_num_threads(own)

    def send(metrics: dict[str, Any], checkpoint: Path | None) -> bool:
        held = tune.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        tune.report(
            {**metrics, **tags.as_metrics()}, checkpoint=held
        )  # Tune copies the checkpoint into the trial's folder
        return False

    # A trial with a share of a GPU sees that GPU alone (Ray set CUDA_VISIBLE_DEVICES); training.device may
    # still say cpu.
    device = resolve_device(options.config.training.device) if options.config.distributed.use_gpu else None
    start = options.start_checkpoint
    run_loop(options, rank=0, world_size=1, device=device or torch.device("cpu"), start=start, send=send, threads=share)


def _train_on_workers(options: WorkerOptions, tags: TrialTags, trial_id: str, storage_path: str) -> None:
    """A Ray Train run over the trial's workers, whose every report (and persisted checkpoint) this driver
    relays to Tune; rank 0 waits at the report gate until Tune has taken it."""
    start = options.start_checkpoint
    reports = Queue(actor_options={"num_cpus": 0})  # Train controller -> driver: Reported, Finished or Failed
    gate = ReportGate.remote()  # driver -> rank 0: Tune took the report of this step, go on
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
            reports.put(Finished())
        except BaseException as error:  # handed to the driver thread, which raises it in the trial
            reports.put(Failed(error))

    threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True).start()
    while True:
        message: Reported | Finished | Failed = reports.get()
        if isinstance(message, Finished):
            return
        if isinstance(message, Failed):
            raise message.error
        checkpoint = message.checkpoint
        held = tune.Checkpoint(path=checkpoint.path, filesystem=checkpoint.filesystem) if checkpoint else None
        # Returns only once Tune has copied the checkpoint and its scheduler lets the trial continue; a
        # stopped or paused trial never gets here, and its workers find the gate gone.
        tune.report({**message.metrics, **tags.as_metrics()}, checkpoint=held)
        ray.get(gate.approve.remote(int(message.metrics["step"])))
