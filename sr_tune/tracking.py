"""MLflow tracking of one training run, from rank 0 only (other ranks get a ``NullTracker``).

Params are the flattened config; metrics are logged with their step at each evaluation, beside an image
grid (LR | bicubic | SR | HR); at the end come the loss/PSNR curves, the best checkpoint folder and the
final model through ``mlflow.pytorch.log_model`` (``pt2`` export with an input example: no pickle).
The default store is a SQLite file; ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` points elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sr_tune.config import TrainConfig
from sr_tune.engine import EvalResult, TrainResult


# Read once, at import: ``mlflow.set_tracking_uri`` rewrites the variable in this process (for its child
# processes), so reading it later would return whatever store was used last rather than the user's choice.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def resolve_tracking_uri(uri: str) -> str:
    """The store to use, decided once where a run or sweep starts: ``MLFLOW_TRACKING_URI`` as the user set
    it, else ``uri``; relative SQLite paths made absolute, so workers started in other folders write to
    the same file. Everything downstream (workers, trials) uses the resolved URI as it is."""
    return absolute_tracking_uri(_USER_TRACKING_URI or uri)


def absolute_tracking_uri(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def prepare_experiment(config: TrainConfig) -> None:
    """Create the experiment from the driver, with artifacts beside a SQLite store (``mlruns/`` next to the
    file) rather than under whatever folder a worker process happens to start in."""
    import mlflow

    uri = absolute_tracking_uri(config.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(config.tracking.experiment) is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
        mlflow.create_experiment(config.tracking.experiment, artifact_location=location)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'data': {'batch_size': 16}} -> {'data.batch_size': 16}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_tags(config_path: str | None = None) -> dict[str, str]:
    """The command line, the config file and the git commit: of the config's repository, else of the
    checkout sr_tune runs from (an editable install), when either is one."""
    tags = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if config_path:
        tags["config_path"] = str(config_path)
    folders = [Path(config_path).resolve().parent] if config_path else []
    for folder in [*folders, Path(__file__).resolve().parent]:
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=folder)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if sha.returncode == 0:
            tags["git_sha"] = sha.stdout.strip()
            break
    return tags


class NullTracker:
    """What ranks other than 0 (and runs with tracking off) get: every call does nothing."""

    run_id: str | None = None

    def log_eval(self, result: EvalResult, extra: dict[str, float] | None = None) -> None:
        pass

    def finish(self, result: TrainResult, model: torch.nn.Module | None = None) -> None:
        pass


class MlflowTracker:
    """One MLflow run: started (or continued, given ``run_id``) on construction, ended by ``finish``."""

    def __init__(self, config: TrainConfig, *, tags: dict[str, str] | None = None, run_id: str | None = None,
                 parent_run_id: str | None = None) -> None:  # fmt: skip
        import mlflow

        self.mlflow, self.config = mlflow, config
        mlflow.set_tracking_uri(absolute_tracking_uri(config.tracking.tracking_uri))
        experiment = mlflow.set_experiment(config.tracking.experiment)
        run_name = config.tracking.run_name or f"{config.model.name}_x{config.model.scale}"
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                               experiment_id=experiment.experiment_id, tags=all_tags)  # fmt: skip
        self.run_id = run.info.run_id
        if run_id is None:
            mlflow.log_params(flatten(config.to_dict()))

    def log_eval(self, result: EvalResult, extra: dict[str, float] | None = None) -> None:
        """The evaluation's metrics (plus ``extra`` ones) at its step, and its image grid."""
        from sr_tune.visualize import preview_grid

        self.mlflow.log_metrics({**result.metrics(), **(extra or {})}, step=result.step)
        if result.preview is not None:
            self.mlflow.log_image(preview_grid(result.preview), f"grids/step_{result.step:07d}.png")

    def finish(self, result: TrainResult, model: torch.nn.Module | None = None) -> None:
        """Curves, the best checkpoint and the model (exported for an LR input of 48x48 pixels)."""
        import matplotlib.pyplot as plt

        from sr_tune.visualize import curves_figure

        figure = curves_figure(result.history)
        self.mlflow.log_figure(figure, "curves.png")
        plt.close(figure)
        if result.best_checkpoint is not None:
            self.mlflow.log_artifacts(str(result.best_checkpoint), "best_checkpoint")
        if model is not None:
            example = torch.rand(1, self.config.in_channels, 48, 48).numpy()
            self.mlflow.pytorch.log_model(model.cpu().eval(), name="model", input_example=example,
                                          serialization_format="pt2")  # fmt: skip
        self.mlflow.set_tag("best_val_psnr", f"{result.best.psnr:.4f}")
        self.mlflow.end_run()


def open_tracker(config: TrainConfig, rank: int, **options: Any) -> MlflowTracker | NullTracker:
    """An MLflow tracker on rank 0 when tracking is on; a ``NullTracker`` everywhere else."""
    if rank != 0 or not config.tracking.enabled:
        return NullTracker()
    return MlflowTracker(config, **options)


# Sweeps: one parent run per study, one nested run per Tune trial. The sweep process writes through
# ``MlflowClient`` with explicit run ids (no process-global active run); each trial's rank-0 worker logs
# its metrics and grids into the nested run the trial driver found or created.

TRIAL_TAG = "sr_tune.trial_id"


def _client(config: TrainConfig) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=absolute_tracking_uri(config.tracking.tracking_uri))


def _experiment_id(config: TrainConfig) -> str:
    prepare_experiment(config)
    return _client(config).get_experiment_by_name(config.tracking.experiment).experiment_id


def start_parent_run(config: TrainConfig, *, name: str, tags: dict[str, str], params: dict[str, Any],
                     files: dict[str, str]) -> str:  # fmt: skip
    """Create the sweep's parent run with its tags, params and text artifacts (``{artifact path: text}``)."""
    from mlflow.entities import Param

    client = _client(config)
    run = client.create_run(_experiment_id(config), run_name=name, tags=tags)
    client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
    for artifact_file, text in files.items():
        client.log_text(run.info.run_id, text, artifact_file)
    return run.info.run_id


def trial_run(config: TrainConfig, *, parent_run_id: str, trial_id: str, name: str, tags: dict[str, str]) -> str:
    """The nested run of Tune trial ``trial_id``: found by its tag when the trial ran before (a resumed sweep,
    a PBT restart), else created with the trial's config as params."""
    from mlflow.entities import Param

    client = _client(config)
    experiment_id = _experiment_id(config)
    found = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                              f"tags.`{TRIAL_TAG}` = '{trial_id}'")  # fmt: skip
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=name,
                            tags={**tags, "mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id})  # fmt: skip
    params = [Param(key, str(value)) for key, value in flatten(config.to_dict()).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    return run.info.run_id


def trial_runs(config: TrainConfig, parent_run_id: str) -> dict[str, Any]:
    """{trial id: run} for every nested run of a sweep."""
    client = _client(config)
    runs = client.search_runs([_experiment_id(config)], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {run.data.tags[TRIAL_TAG]: run for run in runs if TRIAL_TAG in run.data.tags}


def close_trial_run(config: TrainConfig, run_id: str, *, history: list[EvalResult], best_checkpoint: str | None,
                    tags: dict[str, str], failed: bool = False) -> None:  # fmt: skip
    """Curves, the trial's best checkpoint and closing tags; then the run is ended (stopped trials' workers
    were killed before they could end it)."""
    import matplotlib.pyplot as plt

    from sr_tune.visualize import curves_figure

    client = _client(config)
    if history:
        figure = curves_figure(history)
        client.log_figure(run_id, figure, "curves.png")
        plt.close(figure)
    if best_checkpoint is not None:
        client.log_artifacts(run_id, best_checkpoint, "best_checkpoint")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def log_sweep_summary(config: TrainConfig, run_id: str, *, params: dict[str, Any], metrics: dict[str, float],
                      files: dict[str, str], figures: dict[str, Any], tags: dict[str, str]) -> None:  # fmt: skip
    """The best trial's params and metrics, the results table and plots on the parent run."""
    import matplotlib.pyplot as plt
    from mlflow.entities import Metric, Param

    client = _client(config)
    existing = client.get_run(run_id).data.params
    new_params = [Param(key, str(value)) for key, value in params.items() if key not in existing]
    client.log_batch(run_id, params=new_params,
                     metrics=[Metric(key, float(value), int(time.time() * 1000), 0) for key, value in metrics.items()])  # fmt: skip
    for artifact_file, text in files.items():
        client.log_text(run_id, text, artifact_file)
    for artifact_file, figure in figures.items():
        client.log_figure(run_id, figure, artifact_file)
        plt.close(figure)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def register_model(config: TrainConfig, run_id: str, model: torch.nn.Module, registered_name: str) -> str:
    """Log ``model`` (pt2 export, 48x48 LR example) on run ``run_id`` and register it; returns the version."""
    import mlflow

    mlflow.set_tracking_uri(absolute_tracking_uri(config.tracking.tracking_uri))
    example = torch.rand(1, config.in_channels, 48, 48).numpy()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model.cpu().eval(), name="best_model", input_example=example,
                                        serialization_format="pt2", registered_model_name=registered_name)  # fmt: skip
    return str(info.registered_model_version)


def run_status(config: TrainConfig, run_id: str) -> str:
    return _client(config).get_run(run_id).info.status


def end_run(config: TrainConfig, run_id: str) -> None:
    _client(config).set_terminated(run_id, status="FINISHED")
