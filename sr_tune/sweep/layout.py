"""Where a sweep keeps what it writes: one storage root (a folder, or a ``pyarrow.fs`` URI every node reaches)
holding Tune's experiment with the Optuna study, each trial's Train runs, and the state ``--resume`` reads; the
working checkpoints and the log beside it (or in a private scratch folder when the root is remote)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from ray import tune

from sr_tune.errors import InputError
from sr_tune.storage import STORAGE_ENV, Storage, scratch_dir
from sr_tune.study import Study


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
    return Storage.at(chosen or str(Path(study.base_config.training.output_dir) / "sweeps"))


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
class SweepState:
    """What ``--resume`` reads back (``<root>/<study>.json``, written when the sweep starts): the sweep's MLflow
    parent run (None: not tracked), its study file and the command-line overrides it was started with."""

    parent_run_id: str | None
    study: str
    overrides: tuple[str, ...]

    def write(self, storage: Storage, path: str) -> None:
        state = {"parent_run_id": self.parent_run_id, "study": self.study, "overrides": list(self.overrides)}
        storage.write_text(path, json.dumps(state))

    @classmethod
    def read(cls, storage: Storage, path: str) -> SweepState:
        """Raises ``ValueError`` naming ``path`` when it is not a sweep's state."""
        try:
            state = json.loads(storage.read_text(path))
            parent, study, overrides = state["parent_run_id"], state["study"], state["overrides"]
        except (ValueError, TypeError, KeyError) as error:
            raise InputError(f"{path} is not the state of a sweep sr_tune wrote ({error})") from None
        if not (
            (parent is None or isinstance(parent, str))
            and isinstance(study, str)
            and isinstance(overrides, list)
            and all(isinstance(item, str) for item in overrides)
        ):
            raise InputError(f"{path} is not the state of a sweep sr_tune wrote (a value of the wrong type)")
        return cls(parent, study, tuple(overrides))


def _written_by_a_sweep(storage: Storage, state: str, experiment: str) -> bool:
    if storage.exists(state):
        try:
            SweepState.read(storage, state)
        except ValueError:
            return False
        return True
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


def check_storage(study: Study, paths: SweepPaths, resume: bool) -> bool:
    """Before anything starts: whether there is a sweep to restore. Raises when the storage does not answer,
    or holds an earlier sweep of the study and ``resume`` is not set (Tune would overwrite its state)."""
    try:
        exists = paths.storage.exists(paths.storage.path_of(study.name))
        restoring = resume and tune.Tuner.can_restore(paths.experiment)
    except OSError as error:
        raise ConnectionError(f"cannot reach the sweep's storage {paths.storage.uri}: {error}") from None
    if restoring and paths.storage.exists(paths.state):
        started = SweepState.read(paths.storage, paths.state).overrides
        if started != study.overrides:
            raise InputError(
                f"the sweep of study {study.name!r} was started with the overrides {shlex.join(started) or '(none)'}; "
                f"--resume continues it with the same ones (given: {shlex.join(study.overrides) or '(none)'})"
            )
    if exists and not restoring:
        raise FileExistsError(
            f"{paths.experiment} holds an earlier sweep of study {study.name!r}: add --resume to continue it, or "
            f"--restart to remove it and start over (its MLflow runs stay)"
        )
    return restoring
