"""A sweep's final training (``budget.final_steps``): the best trial's values trained again from the start, for
longer, as one Ray Train run over all the CPUs (or GPUs) the sweep's trials shared. Search trials are kept short so that
many configurations can be compared; the winner is then trained once, long, on the whole machine, and its model
is registered when it scores better than the winning trial (``final_wins``).

The run is a nested MLflow run of the sweep tagged as trial ``final``: a resumed sweep finds it again (and Ray
Train continues from its latest checkpoint), and a stopped sweep marks it KILLED like any trial's run."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mlflow import MlflowClient
from ray.train import CheckpointConfig

from sr_tune.config import TrainConfig
from sr_tune.distributed import WorkerOptions, build_trainer
from sr_tune.study import Study
from sr_tune.summary import TrialSummary, best_first
from sr_tune.sweep.layout import SweepPaths
from sr_tune.sweep.search import max_concurrent_trials
from sr_tune.tracking import TRIAL_TAG, find_trial_run, flatten, start_run

FINAL_ID = "final"  # its trial tag, Train run name and working folder


def final_workers(batch_size: int, slots: int) -> int:
    """The most data-parallel workers, at most ``slots``, that split ``batch_size`` evenly: each worker takes
    an equal share, so the final run sees the winning trial's batch (and its learning rate still fits)."""
    return max(w for w in range(1, max(slots, 1) + 1) if batch_size % w == 0)


def final_config(study: Study, params: dict[str, Any], slots: int) -> TrainConfig:
    """The winning ``params`` over at most ``slots`` workers (a whole GPU each on GPUs): ``budget.final_steps``
    steps (at the base batch size, rescaled like a trial's), each worker taking an equal share of the trial's
    batch. It evaluates as often in its length as a full trial does (each evaluation writes a checkpoint)."""
    batch = study.trial_config(params).data.batch_size
    workers = final_workers(batch, slots)
    stretch = max(1, study.budget.final_steps // study.budget.max_steps)
    interval = {"training.eval_interval": study.eval_interval_steps() * stretch}
    config = study.trial_config({**params, **interval}, steps=study.budget.final_steps, workers=workers)
    return replace(
        config,
        data=replace(config.data, batch_size=batch // workers),
        tracking=replace(config.tracking, run_name=f"{study.name}-{FINAL_ID}"),
    )


def final_wins(study: Study, final: TrialSummary | None, winner: TrialSummary) -> bool:
    """Whether the final run scored better than the search's best trial by the study's objective: only then is
    its model the one registered (a longer run at a learning rate chosen on short trials can end worse)."""
    metric = study.objective.metric
    if final is None or metric not in final.best or metric not in winner.best:
        return False
    ahead = final.best[metric] - winner.best[metric]
    return ahead > 0 if study.objective.mode == "max" else ahead < 0


def final_slots(study: Study) -> int:
    """How many workers the final run may spread over: the one-worker slots the sweep's trials ran in at once;
    on GPUs, the whole GPUs those trials held together (four trials of a quarter GPU: one)."""
    slots = max_concurrent_trials(study) * study.resources.workers
    gpus = study.resources.gpus_per_worker
    return max(1, int(slots * gpus + 1e-9)) if gpus else slots


def train_final(
    study: Study,
    paths: SweepPaths,
    winner: TrialSummary,
    config: TrainConfig,
    *,
    client: MlflowClient | None,
    parent_run_id: str | None,
    tags: dict[str, str],
) -> TrialSummary:
    """Train ``config`` (``final_config`` of ``winner``'s values) and return the run as a trial summary (id
    ``final``) whose best checkpoint, by the study's objective, is the best one Ray Train kept."""
    run_id = None
    if client is not None and parent_run_id is not None:
        experiment = config.tracking.experiment
        run_id = find_trial_run(client, experiment, parent_run_id, FINAL_ID)
        if run_id and client.get_run(run_id).info.status == "KILLED":
            client.update_run(run_id, status="RUNNING")  # its sweep was stopped, and now goes on
        run_id = run_id or start_run(
            client,
            experiment,
            name=f"{FINAL_ID} ({winner.name}'s values, {config.training.steps} steps)",
            tags={**tags, TRIAL_TAG: FINAL_ID, "sr_tune.trial": FINAL_ID, "sr_tune.final_of": winner.name},
            params=flatten(config.to_dict()),
            parent_run_id=parent_run_id,
        )
    options = WorkerOptions(
        config=config,
        checkpoint_dir=str(paths.runs / FINAL_ID),
        resume=True,  # a resumed sweep continues its final run (Ray Train's own checkpoint comes first)
        tracking_uri=client.tracking_uri if client is not None else None,
        run_id=run_id,
        close_run=False,  # closed by the sweep's tracker, like every trial's run
        quiet=True,
    )
    objective = study.objective
    trainer = build_trainer(
        options,
        name=FINAL_ID,
        storage_path=paths.train_storage,
        checkpoint_config=CheckpointConfig(
            num_to_keep=study.keep_checkpoints,
            checkpoint_score_attribute=objective.metric,
            checkpoint_score_order=objective.mode,
        ),
    )
    result = trainer.fit()
    kept = best_first(study, [(c.path, m) for c, m in (result.best_checkpoints or [])])
    metrics = dict(result.metrics or {})
    return TrialSummary(
        trial_id=FINAL_ID,
        name=FINAL_ID,
        params=winner.params,
        best=dict(kept[0][1]) if kept else {},
        patches_seen=int(metrics.get("patches_seen", 0)),
        stopped_early=False,
        error=None,
        run_id=run_id,
        best_checkpoint=kept[0][0] if kept else None,
        latest_checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
    )
