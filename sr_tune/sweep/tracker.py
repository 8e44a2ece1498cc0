"""The sweep's MLflow runs, seen from its driver: one parent run per sweep and a nested run per trial (each
trial's process creates its own, ``trial._trial_run_id``). ``SweepTracker`` opens or reopens the parent,
closes each trial's run as the trial ends, and publishes the summary and the best model; ``NullSweepTracker``
is its twin for a sweep that is not tracked, so the driver never asks whether there is a client."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from mlflow import MlflowClient

from sr_tune.checkpoint import load_checkpoint
from sr_tune.importance import Importance
from sr_tune.storage import Storage
from sr_tune.study import Study
from sr_tune.summary import (
    TrialRecord,
    TrialSummary,
    objective_metric,
    parent_description,
    results_csv,
    summary_figures,
    sweep_metrics,
    trial_description,
)
from sr_tune.sweep.final import FINAL_ID, final_wins
from sr_tune.tracking import (
    close_run,
    find_trial_run,
    log_model,
    log_summary,
    register_best,
    share_runs_view,
    start_run,
    trial_runs,
)
from sr_tune.visualize import importance_figure


def trials_page(experiment_id: str, parent_run_id: str) -> str:
    """The MLflow UI's address (after the host) of the sweep's trials: the runs tab in its model-training mode
    (the experiment root would open the GenAI overview, and drop the view), with the sweep's view."""
    view = f"viewStateShareKey={sweep_view_key(parent_run_id)}"
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&{view}"


def sweep_view_key(parent_run_id: str) -> str:
    """The key of the runs-table view of the sweep whose parent run is ``parent_run_id``."""
    return f"sweep-{parent_run_id}"


def trials_view(study: Study, parent_run_id: str) -> dict[str, Any]:
    """The sweep's trials in MLflow's runs table, best first, with the columns that tell them apart: the
    objective, the gain over bicubic, the data seen, the searched values and how each trial ended."""
    metric = study.objective.metric
    metrics = dict.fromkeys([f"best_{metric}", metric, "psnr_gain", "patches_seen"])
    columns = [
        *(f"metrics.`{key}`" for key in metrics),
        *(f"params.`{key}`" for key in study.search),
        "tags.`sr_tune.stopped_early`",
    ]
    return {
        "searchFilter": f"tags.mlflow.parentRunId = '{parent_run_id}'",
        "orderByKey": f"metrics.`best_{metric}`",
        "orderByAsc": study.objective.mode == "min",
        "selectedColumns": columns,
        "columnOrder": columns,
    }


class NullSweepTracker:
    """An untracked sweep: every call does nothing."""

    tracking_uri: str | None = None
    parent_run_id: str | None = None
    tracked = False

    def finished(self) -> bool:
        return False

    def log_threads(self, trial_id: str, threads: int, step: int) -> None:
        pass

    def close_trial(self, trial_id: str, storage: Storage, **ending: Any) -> None:
        pass

    def mark_killed(self) -> None:
        pass

    def mark_failed(self) -> None:
        pass

    def publish(
        self,
        storage: Storage,
        records: list[TrialRecord],
        summaries: list[TrialSummary],
        warnings: list[str],
        importance: Importance | None,
    ) -> str | None:
        return None


class SweepTracker(NullSweepTracker):
    """The parent run ``parent_run_id`` of ``study``'s sweep in ``client``'s store, and its trials' runs."""

    tracked = True

    def __init__(self, client: MlflowClient, study: Study, parent_run_id: str) -> None:
        self.client, self.study, self.parent_run_id = client, study, parent_run_id
        self.tracking_uri = client.tracking_uri
        self.experiment = study.base_config.tracking.experiment

    @classmethod
    def open(cls, client: MlflowClient, study: Study, tags: dict[str, str]) -> SweepTracker:
        """A new sweep's parent run: the study's settings as params, the study file as an artifact."""
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
        experiment = study.base_config.tracking.experiment
        parent_run_id = start_run(client, experiment, name=f"sweep-{study.name}", tags=tags, params=params)
        client.log_text(parent_run_id, study.text, f"search_space/{study.path.name}")
        return cls(client, study, parent_run_id).share_view()

    @classmethod
    def reopen(cls, client: MlflowClient, study: Study, parent_run_id: str) -> SweepTracker:
        """A resumed sweep's parent run: a stopped sweep (KILLED) goes on."""
        if client.get_run(parent_run_id).info.status == "KILLED":
            client.update_run(parent_run_id, status="RUNNING")
        return cls(client, study, parent_run_id).share_view()

    def share_view(self) -> SweepTracker:
        """The runs-table view of this sweep's trials (``trials_view``), stored in the experiment."""
        experiment = self.client.get_run(self.parent_run_id).info.experiment_id
        view = trials_view(self.study, self.parent_run_id)
        share_runs_view(self.client, experiment, sweep_view_key(self.parent_run_id), view)
        return self

    def finished(self) -> bool:
        """Published already: a finished sweep resumed again (a second `make run`) logs nothing twice."""
        return self.client.get_run(self.parent_run_id).info.status == "FINISHED"

    def log_threads(self, trial_id: str, threads: int, step: int) -> None:
        """A ``cpu_threads`` point on the trial's run: its CPU share changed."""
        run_id = find_trial_run(self.client, self.experiment, self.parent_run_id, trial_id)
        if run_id is not None:
            self.client.log_metric(run_id, "cpu_threads", threads, step=step)

    def close_trial(
        self,
        trial_id: str,
        storage: Storage,
        *,
        name: str,
        params: dict[str, Any],
        best: dict[str, Any],
        best_checkpoint: str | None,
        latest_checkpoint: str | None,
        patches_seen: int,
        stopped_early: bool,
        error: str | None,
    ) -> None:
        """End a trial's nested run: curves from its latest checkpoint's history, its best checkpoint, its best
        objective value under the parent's ``best_<objective>`` key (one runs-table column for both), and how it
        ended in its description. A trial that failed before its process created the run has none to end."""
        run_id = find_trial_run(self.client, self.experiment, self.parent_run_id, trial_id)
        if run_id is None:
            return
        history = []
        if latest_checkpoint:
            with storage.local_copy(latest_checkpoint) as folder:
                history = list(load_checkpoint(folder).run.history)
        tags = {
            "sr_tune.stopped_early": str(stopped_early).lower(),
            "sr_tune.patches_seen": str(patches_seen),
            "mlflow.note.content": trial_description(
                self.study, name, params, best, stopped_early=stopped_early, error=error
            ),
        }
        if error:
            tags["sr_tune.error"] = error[-4000:]  # MLflow tag values hold 8000 characters
        with ExitStack() as stack:
            best_folder = stack.enter_context(storage.local_copy(best_checkpoint)) if best_checkpoint else None
            close_run(
                self.client,
                run_id,
                history=history,
                best_checkpoint=best_folder,
                metrics=objective_metric(self.study, best),
                tags=tags,
                failed=error is not None,
            )

    def mark_killed(self) -> None:
        """A stopped sweep's parent and its trials' runs still open are KILLED; a resume sets them running."""
        for run in trial_runs(self.client, self.experiment, self.parent_run_id).values():
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="KILLED")
        self.client.set_terminated(self.parent_run_id, status="KILLED")

    def mark_failed(self) -> None:
        """The sweep ended on an error of its own (not a trial's): the parent run says so."""
        self.client.set_terminated(self.parent_run_id, status="FAILED")

    def publish(
        self,
        storage: Storage,
        records: list[TrialRecord],
        summaries: list[TrialSummary],
        warnings: list[str],
        importance: Importance | None,
        final: TrialSummary | None = None,
    ) -> str | None:
        """End the trials' runs still open (a trial of an interrupted run), then the parent's summary: the best
        trial's values under the trials' own keys, its markdown description, the results table and plots; and
        the best model in the registry (the ``final`` run's when it beat the best trial), and which hyperparameters
        mattered (``importance``). Returns the model's version."""
        study, client = self.study, self.client
        runs = trial_runs(client, self.experiment, self.parent_run_id)
        for summary in [*summaries, *([final] if final else [])]:
            run = runs.get(summary.trial_id)
            if run is not None and run.info.status == "RUNNING":
                self.close_trial(
                    summary.trial_id,
                    storage,
                    name=summary.name,
                    params=summary.params,
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
        figures = summary_figures(study, records, summaries)
        if importance is not None:
            files["importance.csv"] = importance.csv()
            figures["plots/importance.png"] = importance_figure(importance.shares, study.objective.metric)
        experiment_id = client.get_run(self.parent_run_id).info.experiment_id
        run_ids = {trial_id: run.info.run_id for trial_id, run in runs.items()}
        what_mattered = importance.markdown(study.objective.metric) if importance else ""
        description = parent_description(study, summaries, experiment_id, run_ids, importance=what_mattered)
        log_summary(
            client,
            self.parent_run_id,
            params=best.params if best else {},
            metrics=sweep_metrics(study, best.best) if best else {},
            files=files,
            figures=figures,
            tags={**tags, "mlflow.note.content": description},
        )
        final_run = runs.get(final.trial_id) if final and study.objective.metric in final.best else None
        if final_run is not None and best is not None:  # the winner's values trained longer
            client.log_metric(self.parent_run_id, f"final_{study.objective.metric}", final.best[study.objective.metric])
            client.set_tag(self.parent_run_id, "sr_tune.final_run_id", final_run.info.run_id)
            if final_wins(study, final, best):  # else the winning trial's model stays the sweep's
                best, best_run = final, final_run
        version = self._register(storage, best, best_run.info.run_id) if best_run and best.best_checkpoint else None
        # A sweep none of whose trials reported the objective failed, whatever Tune thinks of it.
        client.set_terminated(self.parent_run_id, status="FINISHED" if best else "FAILED")
        return version

    def _register(self, storage: Storage, best: TrialSummary, run_id: str) -> str:
        """The best trial's best checkpoint as its run's model, registered from there as ``sr_tune-<study>``."""
        study = self.study
        registered_name = f"sr_tune-{study.name}"
        with storage.local_copy(best.best_checkpoint) as folder:
            checkpoint = load_checkpoint(folder)
            version = log_model(self.client, run_id, folder, registered_name=registered_name)
        config, value = checkpoint.config, best.best[study.objective.metric]
        final = best.trial_id == FINAL_ID
        origin = "The final run (the best trial's values trained longer)" if final else f"Best trial {best.name}"
        register_best(
            self.client,
            registered_name,
            version,
            description=(
                f"{origin} of sweep {study.name}: {config.model.name} x{config.model.scale} "
                f"({config.data.color}), {study.objective.metric} {value:.4f} at step {checkpoint.step}. Takes image "
                f"files (column `image`, base64) and answers the upscaled PNGs."
            ),
            tags={
                "study": study.name,
                "trial": best.name,
                "trial_id": best.trial_id,
                "model": config.model.name,
                "scale": str(config.model.scale),
                "color": config.data.color,
                study.objective.metric: f"{value:.4f}",
                **({"val_psnr": f"{best.best['val_psnr']:.4f}"} if "val_psnr" in best.best else {}),
            },
        )
        return version
