"""The sweep's driver: Tune's ``Tuner`` built (or restored) for a study and run, each trial's MLflow run
closed the moment it ends, the console view fed, and the sweep summarized and published at the end."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from ray import tune

from sr_tune.console import SweepView
from sr_tune.distributed import init_ray
from sr_tune.importance import Importance, importance
from sr_tune.local_ray import TuneStopWatch, best_checkpoint
from sr_tune.results import TrialProgress
from sr_tune.storage import Storage
from sr_tune.study import Study
from sr_tune.summary import TrialRecord, TrialSummary, edge_warnings, ranked_checkpoints, summarize
from sr_tune.sweep.cpu_shares import CpuShares
from sr_tune.sweep.final import FINAL_ID, final_config, final_slots, final_wins, train_final
from sr_tune.sweep.layout import SweepPaths, SweepState, check_storage, sweep_paths
from sr_tune.sweep.search import max_concurrent_trials, runs_in_trial, search_setup, trial_dirname, trial_namer
from sr_tune.sweep.tracker import NullSweepTracker, SweepTracker
from sr_tune.sweep.trial import TrialContext, TrialTags, trainable
from sr_tune.tracking import run_tags


@dataclass(frozen=True)
class SweepResult:
    study: Study
    trials: list[TrialSummary]  # best first
    parent_run_id: str | None
    model_version: str | None
    warnings: list[str]
    experiment: str  # the URI (local: the path) of Tune's experiment
    unfinished: int = 0  # trials a stop signal (Ctrl-C, SIGTERM) left running: continue with ``resume``
    importance: Importance | None = None  # which searched keys mattered for the objective
    final: TrialSummary | None = None  # the best values trained again for ``budget.final_steps``

    @property
    def final_registered(self) -> bool:
        """Whether the final run's model is the one registered: it beat the best trial."""
        return bool(self.trials) and final_wins(self.study, self.final, self.trials[0])


def _record(study: Study, result: Any) -> TrialRecord:
    """A Ray Tune ``Result`` as the typed record the summaries read."""
    last = dict(result.metrics or {})
    trial_id = Path(result.path).name.removeprefix("trial_")  # the folder ``trial_dirname`` names
    tags = TrialTags.of(last)
    return TrialRecord(
        trial_id=trial_id,
        name=tags.trial_name if tags else trial_id,
        run_id=tags.mlflow_run_id if tags else None,
        patches_seen=TrialProgress.of(last).patches_seen,
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


def _error_line(trial: Any) -> str:
    """The last line of the trial's error file: the exception that ended it."""
    path = Path(trial.error_file) if trial.error_file else None
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path and path.is_file() else []
    return lines[-1].strip() if lines else "failed (Tune recorded no error)"


class _SweepCallback(tune.Callback):
    """In the sweep's driver: keeps the console view current, and ends each trial's MLflow run the moment
    Tune stops or finishes the trial, so the run's end time (and duration) is the trial's. Runs are closed
    (curves drawn, checkpoint uploaded) on a thread of their own: Tune's loop, which starts the next trial
    and lets running ones past their report gate, does not wait for it. ``shares`` (when given) hands the
    running trials the CPUs of the ended ones."""

    def __init__(
        self,
        study: Study,
        storage: Storage,
        view: SweepView | None,
        tracker: NullSweepTracker,
        shares: CpuShares | None = None,
    ) -> None:
        self.study, self.storage, self.view, self.tracker, self.shares = study, storage, view, tracker, shares
        self.closing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="close-trial-run")
        self.closed: list[Future] = []
        self.unfinished: list[str] = []  # trial ids a stop signal (Ctrl-C, SIGTERM) left unfinished
        self.running: list[str] = []
        self.stop_watch = TuneStopWatch()

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Tune pickles its run config, callbacks included, into the experiment: restored, it is the callback of
        # the sweep that restores it.
        return (_restoring_sweeps_callback, ())

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
        self.stop_watch.loop_running()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Tune's cleanup has stopped the trials by now, so the ones unfinished are those running at the last step.
        if self.stop_watch.stopped():
            self.unfinished = self.running

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, None)
        self._share_cpus(trials, ended=trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial, _error_line(trial))
        self._share_cpus(trials, ended=trial.trial_id)

    def _share_cpus(self, trials: list[Any], ended: str | None = None) -> None:
        """New CPU shares go to the trials at once; their runs get a ``cpu_threads`` point on the closing thread."""
        if self.shares is None:
            return
        changed = self.shares.update(trials, ended)
        for trial in trials:
            if trial.trial_id in changed and self.tracker.tracked:
                step = TrialProgress.of(trial.last_result).step
                self.closed.append(
                    self.closing.submit(self.tracker.log_threads, trial.trial_id, changed[trial.trial_id], step)
                )

    def _ended(self, trial: Any, error: str | None) -> None:
        patches = TrialProgress.of(trial.last_result).patches_seen
        stopped = self.study.stopped_early(patches, failed=error is not None)
        if self.view is not None:
            self.view.ended(trial.trial_id, "failed" if error else "stopped" if stopped else "done", error)
        if not self.tracker.tracked:
            return
        best_path, best_values = best_checkpoint(trial)
        self.closed.append(
            self.closing.submit(
                self.tracker.close_trial,
                trial.trial_id,
                self.storage,
                name=str(trial),
                params={key: trial.config.get(key) for key in self.study.search},
                best=best_values,
                best_checkpoint=best_path,
                latest_checkpoint=trial.checkpoint.path if trial.checkpoint else None,
                patches_seen=patches,
                stopped_early=stopped,
                error=error,
            )
        )


def _fit_tuner(
    study: Study, paths: SweepPaths, context: TrialContext, callback: _SweepCallback, restoring: bool
) -> list[TrialRecord]:
    """Build Tune's ``Tuner`` (or restore the interrupted one) and run every trial."""
    if not restoring:
        return [_record(study, result) for result in new_tuner(study, paths, context, [callback]).fit()]
    _restoring.append(callback)  # what the run config's pickled callback becomes (``_SweepCallback.__reduce__``)
    try:
        tuner = tune.Tuner.restore(
            paths.experiment, trainable=trainable(study, context), resume_unfinished=True, resume_errored=True
        )
        return [_record(study, result) for result in tuner.fit()]
    finally:
        _restoring.remove(callback)


_restoring: list[_SweepCallback] = []  # the callback of the sweep this process is restoring


def _restoring_sweeps_callback() -> tune.Callback:
    """A pickled ``_SweepCallback`` unpickled: the callback of the sweep restoring it (one at a time in a
    process); outside a restore (someone reading the experiment's state), a callback that does nothing."""
    return _restoring[-1] if _restoring else tune.Callback()


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
    search_alg, scheduler, param_space, num_samples = search_setup(study, paths.optuna_url, concurrent)
    objective = study.objective
    return tune.Tuner(
        trainable(study, context),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=objective.metric,
            mode=objective.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            time_budget_s=study.budget.time_limit_s or None,
            max_concurrent_trials=None if search_alg else concurrent,  # else the searcher's limiter caps it
            trial_name_creator=trial_namer(study),
            trial_dirname_creator=trial_dirname,
            # On the local Ray a new trial takes over an ended trial's process (Python, torch and sr_tune already
            # imported: seconds saved per trial). Not on a cluster, where Tune then packed a sweep's trials
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
            failure_config=tune.FailureConfig(max_failures=study.base_config.distributed.max_failures),
        ),
    )


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
    restoring = check_storage(study, paths, resume)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="open-tracking") as pool:
        # A new SQLite store runs its schema migrations (seconds) while the local Ray starts.
        opening = pool.submit(lambda: MlflowClient(tracking_uri) if tracking_uri else None)
        # Ray Train runs (trials of several workers, the final run) need the dashboard: its state API is how
        # Ray's placement-group cleaner follows them.
        init_ray(dashboard=not runs_in_trial(study) or study.budget.final_steps > 0)
        client = opening.result()
    max_concurrent_trials(study)  # a trial the cluster cannot hold is refused before the parent run exists
    tags = {**run_tags(str(study.path)), **(tags or {}), "sr_tune.study": study.name}
    tracker: NullSweepTracker = NullSweepTracker()
    if restoring:
        parent_run_id = SweepState.read(paths.storage, paths.state).parent_run_id
        if client and parent_run_id:
            tracker = SweepTracker.reopen(client, study, parent_run_id)
    else:
        if client:
            tracker = SweepTracker.open(client, study, tags)
        SweepState(tracker.parent_run_id, str(study.path), study.overrides).write(paths.storage, paths.state)
    shares = None
    if runs_in_trial(study) and not os.environ.get("RAY_ADDRESS"):  # the trials' processes share this machine
        shares = CpuShares(paths.runs, study, max_concurrent_trials(study))
        shares.clear()
    context = TrialContext(
        study=study,
        paths=paths,
        tracking_uri=tracker.tracking_uri,
        parent_run_id=tracker.parent_run_id,
        tags=tags,
        share_cpus=shares is not None,
    )
    callback = _SweepCallback(study, paths.storage, view, tracker, shares)
    try:
        records = _fit_tuner(study, paths, context, callback, restoring)
    except Exception:
        tracker.mark_failed()  # not left RUNNING: the error is the sweep's own (a stop signal is handled below)
        raise
    finally:
        callback.wait()
        if shares is not None:
            shares.clear()

    if callback.unfinished:  # stopped by a signal: the state is saved, nothing is summarized yet
        tracker.mark_killed()
        return SweepResult(study, [], tracker.parent_run_id, None, [], paths.experiment, len(callback.unfinished))
    summaries = summarize(study, records)
    if view is not None:
        for summary in summaries:  # counts the trials that had ended before a resume
            status = "failed" if summary.error else "stopped" if summary.stopped_early else "done"
            view.restored(summary.trial_id, summary.name, summary.params, status, summary.best)
    if study.scheduler.name == "pbt":
        _prune_checkpoints(study, paths.storage, records)
    scored = [s for s in summaries if study.objective.metric in s.best]
    warnings = edge_warnings(study, scored[0]) if scored else []
    what_mattered = importance(study, records)
    # A finished sweep resumed again (a second `make run`) only shows its results: nothing is logged twice.
    published = tracker.finished()
    final = None
    if study.budget.final_steps and scored and not published:
        try:
            final = _train_final(study, paths, scored[0], tracker, tags, view)
        except KeyboardInterrupt:  # its state is saved: ``resume`` continues the final run
            tracker.mark_killed()
            return SweepResult(study, summaries, tracker.parent_run_id, None, warnings, paths.experiment, 1)
        except Exception:
            tracker.mark_failed()
            raise
    version = None
    if not published:
        version = tracker.publish(paths.storage, records, summaries, warnings, what_mattered, final=final)
    return SweepResult(
        study=study,
        trials=summaries,
        parent_run_id=tracker.parent_run_id,
        model_version=version,
        warnings=warnings,
        experiment=paths.experiment,
        importance=what_mattered,
        final=final,
    )


def _train_final(
    study: Study,
    paths: SweepPaths,
    winner: TrialSummary,
    tracker: NullSweepTracker,
    tags: dict[str, str],
    view: SweepView | None,
) -> TrialSummary:
    """``budget.final_steps`` of the winner's values (``sweep.final``), announced on the console view."""
    config = final_config(study, winner.params, final_slots(study))
    if view is not None:
        view.message(
            f"{FINAL_ID}: {winner.name}'s values trained again for {config.training.steps} steps on "
            f"{config.distributed.num_workers} worker(s) (batch {config.data.batch_size} each)"
        )
    client = MlflowClient(tracker.tracking_uri) if tracker.tracking_uri else None
    final = train_final(study, paths, winner, config, client=client, parent_run_id=tracker.parent_run_id, tags=tags)
    if view is not None:
        metric = study.objective.metric
        reached = {summary.name: summary.best.get(metric) for summary in (final, winner)}
        kept = FINAL_ID if final_wins(study, final, winner) else winner.name
        view.message(
            f"{FINAL_ID}: best {metric} "
            + ", ".join(f"{name} {value:.4f}" for name, value in reached.items() if value is not None)
            + f"; {kept}'s model is the sweep's"
        )
    return final
