"""MLflow, one way: an ``MlflowClient`` for a store URI resolved once where a command starts.

A training run's MLflow run is created by the process that starts it (params = the flattened config); rank 0
of its workers then logs through an ``MlflowTracker`` (every other rank, and runs with tracking off, get a
``NullTracker``; both satisfy ``Tracker``): metrics with their step at each evaluation beside an image grid
(LR | bicubic | SR | HR), and at the end the curves, the best checkpoint folder and the model
(``served_model``: a models-from-code pyfunc that upscales image files; no pickle). Sweeps: one parent run per
study, one nested run per Tune trial, all through the same client calls. Nothing here sets MLflow's
process-wide state, except around the one model-logging call, which reads it and puts it back after.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

from sr_tune.credentials import redacted_command
from sr_tune.engine import TrainResult
from sr_tune.errors import SrTuneError
from sr_tune.results import CONSTANT_METRICS, EvalResult

TRIAL_TAG = "sr_tune.trial_id"
log = logging.getLogger(__name__)


def resolve_tracking_uri(uri: str, override: str | None = None) -> str:
    """The store to use, decided once where a command starts: ``override`` (``--tracking-uri``), else
    ``MLFLOW_TRACKING_URI`` when the user set it, else ``uri``; relative SQLite paths made absolute, so
    workers started in other folders write to the same file. Everything downstream (workers, trials) uses the
    resolved URI as it is."""
    uri = override or os.environ.get("MLFLOW_TRACKING_URI") or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def check_tracking_server(uri: str, timeout_s: float = 3.0, attempts: int = 3) -> None:
    """For a tracking server (``http(s)://``): raise ``TrackingServerError`` naming ``uri`` unless its
    ``/health`` answers, trying ``attempts`` times a second apart (a server restarting), so that an
    unreachable one is found in seconds, before anything starts; MLflow's own client retries for minutes
    first. Other stores are opened where they are used."""
    if not uri.startswith(("http://", "https://")):
        return
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):  # 2xx; else HTTPError
                return
        except urllib.error.HTTPError as error:
            reason = f"/health answered HTTP {error.code}"
        except (urllib.error.URLError, OSError) as error:
            reason = str(getattr(error, "reason", error))
        if attempt + 1 < attempts:
            time.sleep(1.0)
    raise TrackingServerError(
        f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, or point --tracking-uri / "
        f"MLFLOW_TRACKING_URI at a running one"
    )


def last_line(text: str) -> str:
    """An error's own line, not the traceback Ray wraps it in."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


class TrackingServerError(SrTuneError, ConnectionError):
    """The tracking server named by the command does not answer."""


# MLflow's UI shows an experiment as model training (runs, metrics, models) with this kind, instead of the
# GenAI view (traces, latency, tokens) it opens on otherwise; and the note is the experiment's description.
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "Super-resolution runs of sr_tune. Each `sr-tune train` is one run; each `sr-tune tune` sweep is a parent "
        "run (the best trial's metrics under the trials' own names, `results.csv`, plots, and which "
        "hyperparameters mattered) with one nested run per trial. The best model of each sweep is registered as "
        "`sr_tune-<study>`, alias `best`: it takes image files and answers the upscaled PNGs."
    ),
}
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a runs-table view the UI opens with ?viewStateShareKey=key


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it with its artifacts beside a SQLite store (``mlruns/`` next to the
    file) rather than under whatever folder a worker process happens to start in, and ``EXPERIMENT_TAGS``
    (given to one made before them too, where it has none of its own)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        uri = client.tracking_uri
        location = (
            (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri() if uri.startswith("sqlite:") else None
        )
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
    for key, value in EXPERIMENT_TAGS.items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def share_runs_view(client: MlflowClient, experiment: str, key: str, view: dict[str, Any]) -> None:
    """Store a runs-table view (columns, order, filter) in the experiment: the UI opens it at
    ``#/experiments/<id>?viewStateShareKey=<key>``."""
    client.set_experiment_tag(experiment, f"{SHARED_VIEW_TAG}{key}", json.dumps(view))


def follow_moved_store(uri: str, experiment: str) -> str | None:
    """A SQLite store records its artifact root as an absolute path (``<folder>/mlruns``, see
    ``experiment_id``), so a project folder copied or moved elsewhere would go on writing artifacts to the old
    folder. When ``experiment``'s root lies outside the store's folder, this points every path under it (in any
    text column of any table: runs, logged models, model versions, traces) at ``mlruns/`` beside the store,
    in one transaction, provided the artifacts came along (or the old folder is gone). Otherwise the store
    is left as it is. Returns the line to tell the user, or None when the store is where it was made."""
    import sqlite3

    if not uri.startswith("sqlite:///") or not (database := Path(uri.removeprefix("sqlite:///"))).is_file():
        return None
    here = database.parent / "mlruns"
    with closing(sqlite3.connect(database, timeout=30)) as connection:
        row = connection.execute(
            "SELECT experiment_id, artifact_location FROM experiments WHERE name = ?", (experiment,)
        ).fetchone()
        if row is None or not str(row[1]).startswith("file://"):
            return None
        old_uri = str(row[1]).rstrip("/")
        old = Path(urllib.request.url2pathname(old_uri.removeprefix("file://")))
        if old == here or old.name != "mlruns":
            return None  # made here, or a root someone chose on purpose
        runs = [
            run_id for (run_id,) in connection.execute("SELECT run_uuid FROM runs WHERE experiment_id = ?", (row[0],))
        ]
        came_along = any((here / run_id).is_dir() for run_id in runs) or (not runs and here.is_dir())
        if not came_along and old.is_dir():
            return (
                f"note: {database} keeps its artifacts in {old} (it was made there and copied here without them); "
                f"new runs' artifacts go there too. Copy that folder to {here} to make this store self-contained"
            )
        # Both spellings of the root: percent-encoded inside file:// URIs, plain in local paths.
        pairs = {(old_uri.removeprefix("file://"), here.as_uri().removeprefix("file://")), (str(old), str(here))}
        with connection:
            for (table,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                for column in [info[1] for info in connection.execute(f'PRAGMA table_info("{table}")')]:
                    for before, after in pairs:
                        _replace_root(connection, f'"{table}"', f'"{column}"', before, after)
    return f"{database} was made in {old.parent}: its artifact paths now point to {here}"


def _replace_root(connection: Any, table: str, column: str, before: str, after: str) -> None:
    """``before`` -> ``after`` where it begins a path: as the whole value or its start, and after ``file://``
    anywhere in the value (a URI inside a JSON tag too); never inside a longer path."""
    text = f"typeof({column}) = 'text'"
    connection.execute(
        f"UPDATE {table} SET {column} = replace({column}, ?, ?) WHERE {text} AND instr({column}, ?) > 0",
        (f"file://{before}/", f"file://{after}/", f"file://{before}/"),
    )
    connection.execute(f"UPDATE {table} SET {column} = ? WHERE {column} = ?", (f"file://{after}", f"file://{before}"))
    connection.execute(
        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
        f"WHERE {text} AND ({column} = ? OR substr({column}, 1, ?) = ?)",
        (after, len(before) + 1, before, len(before) + 1, before + "/"),
    )


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
    tags = {"command": redacted_command()}
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


def param_text(value: Any) -> str:
    """A param as MLflow shows it: a float a searcher drew (``0.0025575632...``) with 5 significant digits and
    its exponent (``2.5576e-03``), which a runs-table column would otherwise cut off; short values as they are.
    The exact value is in the run's checkpoints and in Tune's results."""
    text = str(value)
    if isinstance(value, float) and len(text) > 10:
        return f"{value:.4e}"
    return text


def start_run(
    client: MlflowClient,
    experiment: str,
    *,
    name: str,
    tags: dict[str, str],
    params: dict[str, Any],
    parent_run_id: str | None = None,
) -> str:
    """Create a run (nested under ``parent_run_id`` when given) with its tags and params; returns its id."""
    nesting = {"mlflow.parentRunId": parent_run_id} if parent_run_id else {}
    run = client.create_run(experiment_id(client, experiment), run_name=name, tags={**tags, **nesting})
    batch = [Param(key, param_text(value)) for key, value in params.items()]
    for start in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=batch[start : start + 100])
    return run.info.run_id


def find_trial_run(client: MlflowClient, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    """The nested run of Tune trial ``trial_id`` when the trial ran before (a resumed sweep, a PBT restart)."""
    found = trial_runs(client, experiment, parent_run_id, f" and tags.`{TRIAL_TAG}` = '{trial_id}'")
    return found[trial_id].info.run_id if trial_id in found else None


def trial_runs(client: MlflowClient, experiment: str, parent_run_id: str, also: str = "") -> dict[str, Any]:
    """{trial id: run} for every nested run of a sweep (``also``: more of the filter)."""
    runs = client.search_runs(
        [experiment_id(client, experiment)], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'{also}"
    )
    return {run.data.tags[TRIAL_TAG]: run for run in runs if TRIAL_TAG in run.data.tags}


def log_figures(client: MlflowClient, run_id: str, figures: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    for artifact_file, figure in figures.items():
        client.log_figure(run_id, figure, artifact_file)
        plt.close(figure)


def close_run(
    client: MlflowClient,
    run_id: str,
    *,
    history: list[EvalResult],
    best_checkpoint: str | Path | None,
    tags: dict[str, str],
    metrics: dict[str, float] | None = None,
    failed: bool = False,
) -> None:
    """Curves, the best checkpoint folder, closing ``metrics`` (one value each) and tags; then the run is
    ended, FAILED when ``failed``."""
    from sr_tune.visualize import curves_figure

    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])
    if history:
        log_figures(client, run_id, {"curves.png": curves_figure(history)})
    if best_checkpoint is not None:
        client.log_artifacts(run_id, str(best_checkpoint), "best_checkpoint")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))


def log_summary(
    client: MlflowClient,
    run_id: str,
    *,
    params: dict[str, Any],
    metrics: dict[str, float],
    files: dict[str, str],
    figures: dict[str, Any],
    tags: dict[str, str],
) -> None:
    """A sweep's closing record on its parent run: the best trial's params and metrics, tables and plots."""
    existing = client.get_run(run_id).data.params
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        params=[Param(key, param_text(value)) for key, value in params.items() if key not in existing],
        metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
    )
    for artifact_file, text in files.items():
        client.log_text(run_id, text, artifact_file)
    log_figures(client, run_id, figures)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def register_best(client: MlflowClient, name: str, version: str, *, description: str, tags: dict[str, str]) -> None:
    """Describe and tag a sweep's registered best model, and point the model's alias ``best`` at it."""
    client.update_registered_model(
        name, description=f"The best model of each sr_tune sweep of study {tags['study']}; alias `best`: the latest."
    )
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "best", version)


def log_model(
    client: MlflowClient, run_id: str, checkpoint_folder: str | Path, *, registered_name: str | None = None
) -> str | None:
    """Log the checkpoint in ``checkpoint_folder`` as run ``run_id``'s model (``served_model``: image files in,
    upscaled PNGs out), registered as ``registered_name`` when given; returns the registered version."""
    from sr_tune.served_model import log_image_model, process_store

    with process_store(client.tracking_uri, client.get_run(run_id).info.experiment_id):
        info = log_image_model(run_id, checkpoint_folder, registered_name=registered_name)
    return str(info.registered_model_version) if registered_name else None


class Tracker(Protocol):
    """What the training loop's caller logs through: the run's evaluations, then its end."""

    run_id: str | None

    def log_eval(self, result: EvalResult, extra: dict[str, float] | None = None) -> None: ...

    def catch_up(self) -> None: ...

    def flush(self) -> None: ...

    def finish(self, result: TrainResult) -> None: ...


class NullTracker:
    """What ranks other than 0 (and runs with tracking off) get: every call does nothing."""

    run_id: str | None = None

    def log_eval(self, result: EvalResult, extra: dict[str, float] | None = None) -> None:
        pass

    def catch_up(self) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, result: TrainResult) -> None:
        pass


class MlflowTracker:
    """An existing MLflow run, logged to through ``client``; ``finish`` ends it.

    Evaluations are sent on a thread of their own, in order: a tracking server that stops answering does
    not stop training. MLflow's client retries each request with backoff (for minutes); meanwhile the
    evaluations queue up, a warning says so once the server has been silent for ``QUIET_S``, and they are
    sent when it answers again. ``flush`` waits for the queue (the end of a run, or of a worker)."""

    QUIET_S = 10.0
    GIVE_UP_S = 1800.0  # a request the server has not taken in this long is dropped, with an error

    def __init__(self, client: MlflowClient, run_id: str, *, tags: dict[str, str]) -> None:
        self.client, self.run_id = client, run_id
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        # A resumed run has them already.
        self.constants_logged = set(client.get_run(run_id).data.metrics) >= set(CONSTANT_METRICS)
        self.logged_through = max((m.step for m in client.get_metric_history(run_id, "val_psnr")), default=0)
        self.outbox: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self.sending_since: float | None = None  # when the request now in flight was first tried
        self.warned = False
        self.sender = threading.Thread(target=self._send, name=f"mlflow-{run_id[:8]}", daemon=True)
        self.sender.start()

    def log_eval(self, result: EvalResult, extra: dict[str, float] | None = None) -> None:
        """The evaluation's metrics (plus ``extra`` ones) at its step, and its image grid; the metrics that
        never change within a run (``CONSTANT_METRICS``) only the first time. A step the run holds already
        (evaluated again after a restart from an older checkpoint) is not logged twice."""
        from sr_tune.visualize import preview_grid

        if result.step <= self.logged_through:
            return
        self.logged_through = result.step
        now = int(time.time() * 1000)
        metrics = {**result.metrics(), **(extra or {})}
        if self.constants_logged:
            metrics = {key: value for key, value in metrics.items() if key not in CONSTANT_METRICS}
        self.constants_logged = True
        batch = [Metric(k, float(v), now, result.step) for k, v in metrics.items()]
        # Two requests, each retried on its own: a retried image never logs the metrics twice.
        self.outbox.put(functools.partial(self.client.log_batch, self.run_id, metrics=batch))
        if result.preview is not None:
            grid = preview_grid(result.preview)
            path = f"grids/step_{result.step:07d}.png"
            self.outbox.put(functools.partial(self.client.log_image, self.run_id, grid, path))
        self._warn_if_silent()

    def _send(self) -> None:
        while (request := self.outbox.get()) is not None:
            self._send_one(request)
            self.outbox.task_done()
        self.outbox.task_done()

    def _send_one(self, request: Callable[[], Any]) -> None:
        self.sending_since = time.monotonic()
        while True:
            try:
                request()
                break
            except Exception as error:  # MLflow's own retries gave up: the server is still away
                if time.monotonic() - self.sending_since > self.GIVE_UP_S:
                    log.error("MLflow run %s: not logged, given up: %s", self.run_id, last_line(str(error)))
                    break
                self._warn_if_silent(force=True)
                time.sleep(self.QUIET_S)
        if self.warned:
            log.warning("MLflow run %s: the tracking server answers again; the evaluations held are sent", self.run_id)
            self.warned = False
        self.sending_since = None

    def _warn_if_silent(self, force: bool = False) -> None:
        """Once per outage: when a request has waited ``QUIET_S`` (or, ``force``, failed)."""
        since = self.sending_since
        if self.warned or since is None or not (force or time.monotonic() - since > self.QUIET_S):
            return
        self.warned = True
        log.warning(
            "MLflow run %s: the tracking server at %s has not answered for %.0f s; training goes on, and %d "
            "request(s) wait to be sent",
            self.run_id,
            self.client.tracking_uri,
            time.monotonic() - since,
            self.outbox.qsize() + 1,
        )

    def catch_up(self) -> None:
        """Until what was logged so far is sent, unless the server is away (then at once, or within
        ``QUIET_S``, when the outage is about to be warned of)."""
        with self.outbox.all_tasks_done:
            self.outbox.all_tasks_done.wait_for(lambda: not self.outbox.unfinished_tasks or self.warned, self.QUIET_S)

    def flush(self) -> None:
        """Until every evaluation logged so far has been sent (however long the server takes)."""
        if self.sender.is_alive():
            self.outbox.put(None)
            self.sender.join()

    def finish(self, result: TrainResult) -> None:
        """Curves, the best checkpoint and the model made of it; then the run is ended."""
        self.flush()
        if result.best_checkpoint is not None:
            log_model(self.client, self.run_id, result.best_checkpoint)
        close_run(
            self.client,
            self.run_id,
            history=result.history,
            best_checkpoint=result.best_checkpoint,
            tags={"best_val_psnr": f"{result.best.psnr:.4f}"},
        )


def open_tracker(
    tracking_uri: str | None, run_id: str | None, rank: int, tags: dict[str, str] | None = None
) -> Tracker:
    """An MLflow tracker of run ``run_id`` on rank 0 when tracking is on, which sets ``tags`` (e.g. the node
    rank 0 runs on); a ``NullTracker`` everywhere else."""
    if rank != 0 or tracking_uri is None or run_id is None:
        return NullTracker()
    return MlflowTracker(MlflowClient(tracking_uri), run_id, tags=tags or {})
