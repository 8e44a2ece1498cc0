"""Ray Train around the engine: a ``TorchTrainer`` whose workers each run ``engine.train`` on their shard.

DDP comes from Ray (gloo on CPU, NCCL on GPU); rank 0 logs to MLflow and hands its checkpoints to
``ray.train.report``, which persists them to ``RunConfig.storage_path`` (a folder or any pyarrow.fs URI).
After a worker failure, Ray restarts the group and each worker resumes from the last reported checkpoint
(``FailureConfig.max_failures``). ``distributed.num_workers: 0`` is Ray's local mode: the loop runs in
this process, which is what quick runs and tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from mlflow import MlflowClient
from ray.actor import ActorHandle
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from sr_tune.checkpoint import has_checkpoint, load_checkpoint
from sr_tune.config import TrainConfig
from sr_tune.engine import TrainResult, train
from sr_tune.local_ray import LoopbackTorchConfig, single_machine_ray
from sr_tune.results import EvalResult
from sr_tune.tracking import flatten, last_line, open_tracker, run_tags, start_run


@dataclass(frozen=True)
class FitResult:
    metrics: dict[str, Any]  # the last metrics rank 0 reported
    checkpoint: str | None  # the latest persisted checkpoint (Ray storage; local mode: the local folder)
    best_checkpoints: list[tuple[str, dict[str, Any]]]  # kept checkpoints with their metrics
    run_id: str | None  # the MLflow run


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """Everything a Ray Train worker needs besides Ray's own context: what crosses to it, typed."""

    config: TrainConfig
    checkpoint_dir: str  # rank 0's engine writes last/ and best/ here
    resume: bool = False  # continue from checkpoint_dir/last (when there is no newer Train checkpoint)
    start_checkpoint: ray.train.Checkpoint | None = None  # e.g. the one a Tune trial was restored or exploited with
    tracking_uri: str | None = None  # the resolved MLflow store; None = no tracking
    run_id: str | None = None  # the MLflow run rank 0 logs to
    hyperparameters: dict[str, float] = field(default_factory=dict)  # logged as hp/<key> (PBT changes them)
    close_run: bool = True  # log curves and model and end the run (a sweep's driver closes its trials' runs)
    quiet: bool = False  # no progress lines or Train report logs: a sweep's console shows Tune's status instead
    # After each report rank 0 waits for a token from a Tune trial's driver, which sends one only when Tune
    # lets the trial continue; when the driver is gone (the scheduler stopped or paused the trial) every rank
    # ends training there, so nothing is logged past what Tune saw.
    report_gate: ActorHandle | None = None  # a ``ReportGate``


def init_ray(num_cpus: float | None = None, *, num_gpus: float | None = None, dashboard: bool = True) -> None:
    """Connect to ``RAY_ADDRESS`` when set; otherwise start a local Ray that listens on 127.0.0.1 only (with
    ``num_cpus`` and ``num_gpus``, default: what it detects), with its dashboard unless ``dashboard`` is
    false: stopped Ray Train runs free their workers' CPUs only through the dashboard's cleanup, and a sweep
    that starts none does without it (a faster start)."""
    if ray.is_initialized():
        return
    with _sigterm_handler_kept():
        _start_or_connect(num_cpus, num_gpus, dashboard)


@contextlib.contextmanager
def _sigterm_handler_kept() -> Iterator[None]:
    """``ray.init`` sets its own SIGTERM handler, which kills a local Ray at once and exits: the caller's (the
    CLI's, which stops a run as Ctrl-C does, letting Tune save the sweep) is put back."""
    ours = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(ours) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)


def _start_or_connect(num_cpus: float | None, num_gpus: float | None, dashboard: bool) -> None:
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    # Ray Train watches for the node being drained (preempted) with one actor per run: a single machine is
    # never drained, and each actor is a process to start on every trial.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    with single_machine_ray():  # everything it starts listens on 127.0.0.1 only
        ray.init(
            address="local",  # a new one: never a cluster some `ray start` left on this machine
            num_cpus=int(num_cpus) if num_cpus else None,
            num_gpus=num_gpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            configure_logging=False,
        )


def shutdown_ray() -> None:
    """Stop this process's Ray (a local one with it), so that its shutdown output lands where stdout goes now."""
    ray.shutdown()


def progress_line(result: EvalResult, total_steps: int) -> str:
    eta = result.seconds / result.step * (total_steps - result.step)
    return (
        f"step {result.step:>6}/{total_steps}  loss {result.loss:.5f}  "
        f"val PSNR-Y {result.psnr:.2f} dB (bicubic {result.bicubic_psnr:.2f})  SSIM {result.ssim:.4f}  "
        f"{result.patches_per_second:,.0f} patches/s  ETA {eta:,.0f}s"
    )


# Hands one evaluation's metrics (and, on rank 0 at a checkpoint, a folder holding a copy of it) to Ray; True
# when training must end there (the sweep stopped the trial).
Send = Callable[[dict[str, Any], Path | None], bool]


def _worker(loop_config: dict[str, WorkerOptions]) -> None:
    """Runs on every Ray Train worker (or in-process in local mode): ``run_loop`` on this rank's shard,
    reporting to Ray Train, and, in a sweep, waiting at the report gate."""
    options = loop_config["options"]
    # Ray Train's INFO lines ("Reported metrics: {...}", "Reporting training result ...", from its own logger
    # and the root logger it configures on workers) repeat what the progress line says.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    def send(metrics: dict[str, Any], checkpoint: Path | None) -> bool:
        reported = ray.train.Checkpoint.from_directory(str(checkpoint)) if checkpoint else None
        ray.train.report(metrics, checkpoint=reported)
        gate = options.report_gate
        return gate is not None and _gate_closed(gate, int(metrics["step"]), rank, world_size)

    start = ray.train.get_checkpoint() or options.start_checkpoint  # Train's own first: it is newer
    run_loop(options, rank=rank, world_size=world_size, device=ray.train.torch.get_device(), start=start, send=send)


def run_loop(
    options: WorkerOptions,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    start: Any,
    send: Send,
    threads: Callable[[], int] | None = None,
) -> None:
    """``engine.train`` on this rank's shard, from ``start`` (a Ray checkpoint) or ``options``' own last
    checkpoint, logging each evaluation to MLflow (rank 0) and handing it to ``send``; ``threads`` as
    ``engine.train`` takes it."""
    config = options.config
    checkpoint_dir = Path(options.checkpoint_dir)
    resume = None
    if start is not None:
        with start.as_directory() as folder:
            resume = load_checkpoint(folder)
    elif options.resume and has_checkpoint(checkpoint_dir / "last"):
        resume = load_checkpoint(checkpoint_dir / "last")
    tracker = open_tracker(options.tracking_uri, options.run_id, rank, _node_tags())
    hyperparameters = {f"hp/{key}": value for key, value in options.hyperparameters.items()}

    def log(result: EvalResult) -> int:
        patches_seen = result.step * config.data.batch_size * world_size
        tracker.log_eval(result, {"patches_seen": patches_seen, **hyperparameters})
        return patches_seen

    # A stop between saving a checkpoint and logging its evaluation left that evaluation out of the run: the
    # checkpoint's history has it (the steps the run holds are skipped).
    for past in resume.run.history if resume else ():
        log(past)

    reported = checkpoint_dir / ".reported"  # rank 0's copy of the checkpoint it reports

    def report(result: EvalResult, checkpoint: Path | None) -> bool:
        patches_seen = log(result)
        if rank == 0 and not options.quiet:
            print(progress_line(result, config.training.steps), flush=True)
        metrics = {"step": result.step, "patches_seen": patches_seen, **result.metrics(), **hyperparameters}
        # What Ray hears of is in the run first: a sweep may end this process as soon as it has heard.
        tracker.catch_up()
        if checkpoint is None:
            return send(metrics, None)
        # Ray is handed a copy (the engine rewrites `last` at its next evaluation), kept in one place that the
        # next report replaces: a sweep may end this process inside `send`, before anything could be removed.
        shutil.rmtree(reported, ignore_errors=True)
        return send(metrics, shutil.copytree(checkpoint, reported / checkpoint.name))

    try:
        result: TrainResult = train(
            config,
            on_eval=report,
            checkpoint_dir=checkpoint_dir if rank == 0 else None,
            resume=resume,
            device=device,
            rank=rank,
            world_size=world_size,
            mlflow_run_id=options.run_id,
            threads=threads,
        )
    finally:
        tracker.flush()  # what was logged reaches the run before it is ended, here or by a sweep's driver
        if rank == 0:  # the others share the folder on this machine, and may end first
            shutil.rmtree(reported, ignore_errors=True)
    if options.close_run:
        tracker.finish(result)


def _node_tags() -> dict[str, str]:
    """Where this worker runs, for its MLflow run: Ray's node id and address, and the GPUs Ray gave it (none
    in Ray's local mode)."""
    if not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    gpus = context.get_accelerator_ids().get("GPU", [])
    return {
        "sr_tune.node_id": context.get_node_id(),
        "sr_tune.node_ip": ray.util.get_node_ip_address(),
        **({"sr_tune.gpu_ids": ",".join(gpus)} if gpus else {}),
    }


class _ReportGate:
    """Between a Tune trial's driver and rank 0 of its Ray Train run: after each report, rank 0 waits until the
    driver has relayed the report of that step to Tune and Tune lets the trial go on. Waiting reads the
    approved step and takes nothing: a rank killed while it waited (its call still pending here) leaves the
    approval to the rank that replaces it, where a queue would have handed its token to the dead call."""

    def __init__(self) -> None:
        self.approved = 0  # the last step the driver relayed
        self.changed = asyncio.Condition()

    async def approve(self, step: int) -> None:
        async with self.changed:
            self.approved = max(self.approved, step)
            self.changed.notify_all()

    async def wait(self, step: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.approved >= step)


# Owned by the trial's driver process: when Tune stops the trial, the gate goes with it.
ReportGate = ray.remote(num_cpus=0)(_ReportGate)


def _gate_closed(gate: ActorHandle, step: int, rank: int, world_size: int) -> bool:
    """Rank 0 waits for the driver's go-ahead for ``step``; the answer (continue or stop) is shared with every
    rank."""
    stop = torch.zeros(1)
    if rank == 0:
        try:
            ray.get(gate.wait.remote(step))
        except ray.exceptions.RayActorError:  # the driver (and the gate it owned) is gone
            stop.fill_(1)
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.broadcast(stop, src=0)
    return bool(stop.item())


def build_trainer(
    options: WorkerOptions,
    *,
    name: str,
    storage_path: str,
    driver_cpus: float = 0.0,
    callbacks: list[Any] | None = None,
    checkpoint_config: CheckpointConfig | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` running ``_worker`` with ``options`` over ``distributed.num_workers`` workers.

    ``driver_cpus``: what the calling process itself reserves (a Tune trial's driver); it is taken off the
    workers' requests so that one run asks for exactly ``num_workers * cpus_per_worker`` CPUs in all.
    ``checkpoint_config`` defaults to keeping ``distributed.keep_checkpoints``, best by ``val_psnr``.
    """
    dist = options.config.distributed
    worker_cpus = dist.cpus_per_worker - driver_cpus / max(dist.num_workers, 1)
    # Ray Train sends each print of a worker both to its stdout and, as a log record, to its stderr: every
    # progress line showed twice. Plain prints (Ray forwards them once); Ray passes the setting to the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return TorchTrainer(
        _worker,
        train_loop_config={"options": options},
        torch_config=LoopbackTorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers,
            use_gpu=dist.use_gpu,
            resources_per_worker={"CPU": worker_cpus, **({"GPU": 1} if dist.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=checkpoint_config
            or CheckpointConfig(
                num_to_keep=dist.keep_checkpoints, checkpoint_score_attribute="val_psnr", checkpoint_score_order="max"
            ),
            callbacks=callbacks,
            # The controller's INFO notes (resources requested, the worker group started with each rank's
            # pid) are for Ray's own log files; its warnings and errors still show.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def ray_storage_path(config: TrainConfig) -> str:
    """Where Ray Train persists the run's checkpoints: ``distributed.storage_path``, else
    ``<training.output_dir>/ray``; the run itself is the folder ``<that>/<run name>``."""
    return config.distributed.storage_path or str(Path(config.training.output_dir).resolve() / "ray")


def earlier_run_files(config: TrainConfig) -> list[str]:
    """What an earlier run of the same name left, which a fresh run would overwrite (its ``last``/``best``)
    or, through Ray Train, silently resume from: its folder under ``training.output_dir`` when not empty,
    and its Ray Train run folder. Empty when the name is free."""
    from sr_tune.storage import Storage

    found = []
    output = Path(config.training.output_dir) / config.run_name
    if (output.is_dir() and any(output.iterdir())) or output.is_file():
        found.append(str(output))
    if config.distributed.num_workers > 0:
        storage = Storage.at(ray_storage_path(config))
        if storage.exists(storage.path_of(config.run_name)):
            found.append(storage.uri_of(config.run_name))
    return found


def fit(
    config: TrainConfig,
    *,
    config_path: str | None = None,
    resume: bool = False,
    client: MlflowClient | None = None,
) -> FitResult:
    """Train ``config`` through Ray Train and return what rank 0 reported; logged to ``client``'s store (None:
    not tracked). The MLflow run is created here, or continued when ``resume`` finds the run's last checkpoint."""
    dist = config.distributed
    name = config.run_name
    output = Path(config.training.output_dir).resolve() / name
    storage = ray_storage_path(config)
    run_id = None
    if client is not None:
        if resume and has_checkpoint(output / "last"):
            run_id = load_checkpoint(output / "last").run.mlflow_run_id
        run_id = run_id or start_run(
            client, config.tracking.experiment, name=name, tags=run_tags(config_path), params=flatten(config.to_dict())
        )
    if dist.num_workers > 0:
        init_ray()
    options = WorkerOptions(
        config=config,
        checkpoint_dir=str(output),
        resume=resume,
        run_id=run_id,
        tracking_uri=client.tracking_uri if client is not None else None,
    )
    try:
        result = build_trainer(options, name=name, storage_path=storage).fit()
    except BaseException as error:  # the run says how it ended: KILLED when interrupted, else FAILED and why
        if client is not None and run_id is not None:
            interrupted = isinstance(error, KeyboardInterrupt)
            if not interrupted:
                client.set_tag(run_id, "sr_tune.error", last_line(str(error) or type(error).__name__)[-4000:])
            client.set_terminated(run_id, status="KILLED" if interrupted else "FAILED")
        raise
    if dist.num_workers == 0:  # local mode persists nothing to storage: the run's own folder holds it
        checkpoint, best = str(output / "last"), []
    else:
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        best = [(c.path, m) for c, m in (result.best_checkpoints or [])]
    return FitResult(metrics=dict(result.metrics or {}), checkpoint=checkpoint, best_checkpoints=best, run_id=run_id)
