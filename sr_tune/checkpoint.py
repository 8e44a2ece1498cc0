"""Checkpoints: a folder with ``weights.safetensors`` (tensors only) and ``checkpoint.json``.

``weights.safetensors`` holds the model, and for training runs also the EMA weights, the discriminator,
the optimizers' state and the RNG state; ``checkpoint.json`` holds the full ``TrainConfig``, the step, the
last metrics and the rest of the training state (optimizer hyperparameters, metric history), so a
checkpoint alone rebuilds its model and resumes its run exactly. Loading never unpickles: pickle files
(``.pt``, ``.pth``, ``.ckpt``) are refused. Writes go to a temporary sibling folder that is renamed into
place, so a crash never leaves a half-written checkpoint under the final name, and a save replaces only
a folder that holds nothing but a checkpoint's two files: a folder with anything else in it (a user's own
files) is refused, or with ``keep_other_files`` gets the two files beside what it holds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sr_tune.config import TrainConfig
from sr_tune.errors import InputError
from sr_tune.models import create_model
from sr_tune.results import EvalResult

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "checkpoint.json"
FORMAT_VERSION = 2
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".bin")
CHECKPOINT_FILES = frozenset({WEIGHTS_FILE, META_FILE})
# checkpoint.json holds a config, metrics and a run's evaluation history: kilobytes to a few megabytes.
MAX_META_BYTES = 64 * 2**20


@dataclass(frozen=True)
class RunState:
    """The JSON side of a training run's ``last`` checkpoint that a resume and a sweep read back: the run's
    evaluations so far and the MLflow run it logs to. A ``best`` checkpoint (weights only) has none."""

    history: tuple[EvalResult, ...] = ()
    mlflow_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"history": [result.to_dict() for result in self.history], "mlflow_run_id": self.mlflow_run_id}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> RunState:
        """Raises ``ValueError`` naming ``source`` for a state sr_tune did not write."""
        history, run_id = data.get("history", []), data.get("mlflow_run_id")  # absent: a checkpoint of weights only
        try:
            if not isinstance(history, list) or not (run_id is None or isinstance(run_id, str)):
                raise TypeError("history must be a list and mlflow_run_id a string")
            return cls(tuple(EvalResult(**entry) for entry in history), run_id)
        except TypeError as error:
            raise InputError(f"{source}: state: not a training state sr_tune wrote ({error})") from None


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A loaded checkpoint. ``tensors`` holds every group under its prefix: ``model.``, ``ema.``,
    ``discriminator.``, ``optimizer.``, ``d_optimizer.``, ``rng.``; ``optimizers`` the optimizers' JSON side
    (param groups, scalar state) by name; ``run`` what the run recorded."""

    config: TrainConfig
    step: int
    metrics: dict[str, float]
    tensors: dict[str, torch.Tensor]
    optimizers: dict[str, Any] = field(default_factory=dict)
    run: RunState = RunState()
    path: Path = Path("checkpoint")  # the folder it was read from, named by errors

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``prefix.``, with the prefix removed (empty if there are none)."""
        return {k.removeprefix(f"{prefix}."): v for k, v in self.tensors.items() if k.startswith(f"{prefix}.")}

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        """The weights to use for inference: the EMA weights when the run kept them, else the raw ones."""
        return self.group("ema") or self.group("model")

    def build_model(self) -> nn.Module:
        """The checkpoint's network with its (EMA if kept) weights loaded, in eval mode."""
        model = create_model(
            self.config.model.name,
            scale=self.config.model.scale,
            in_channels=self.config.in_channels,
            **self.config.model.kwargs,
        )
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as error:  # missing, unexpected or misshapen tensors: not this model's weights
            problem = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise InputError(
                f"{self.path / WEIGHTS_FILE}: the weights do not fit {self.config.model.name} "
                f"x{self.config.model.scale} as {META_FILE} describes it ({problem})"
            ) from None
        return model.eval()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state into tensors (for safetensors) and JSON (param groups, scalar state)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of ``optimizer_tensors``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module | dict[str, torch.Tensor],
    config: TrainConfig,
    step: int,
    metrics: dict[str, float] | None = None,
    modules: dict[str, nn.Module | dict[str, torch.Tensor]] | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    run: RunState | None = None,
    keep_other_files: bool = False,
) -> Path:
    """Write ``model`` (plus optional extra ``modules`` and ``optimizers`` by name; modules or their state
    dicts), the config, step,
    metrics and the ``run``'s state atomically to folder ``path``. The torch RNG state is saved too.

    An existing ``path`` is replaced only when it is empty or an sr_tune checkpoint (its two files, nothing
    else); one that holds anything else raises ``FileExistsError`` before anything is written, unless
    ``keep_other_files``: then the two files are put into it, one rename each, and nothing else is touched."""
    path = Path(path)
    _put_back_after_a_killed_save(path)  # its predecessor in place first, so that it is what gets retired
    foreign = foreign_entries(path)
    if foreign and not keep_other_files:
        raise FileExistsError(
            f"{path} holds files that are not an sr_tune checkpoint ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); nothing was written: choose a new or empty folder"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in _state(model).items()}
    for name, module in (modules or {}).items():
        tensors.update({f"{name}.{k}": v for k, v in _state(module).items()})
    optimizer_meta = {}
    for name, optimizer in (optimizers or {}).items():
        values, optimizer_meta[name] = optimizer_tensors(optimizer)
        tensors.update({f"{name}.{k}": v for k, v in values.items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "metrics": metrics or {},
        "config": config.to_dict(),
        "optimizers": optimizer_meta,
        "state": run.to_json() if run else {},
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, staging / WEIGHTS_FILE)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        if foreign:  # beside the user's files, which stay as they are
            for name in (WEIGHTS_FILE, META_FILE):
                os.replace(staging / name, path / name)
            staging.rmdir()
        elif path.exists():
            retired = _retired(path)
            if retired.exists() or retired.is_symlink():
                if foreign_entries(retired):
                    raise FileExistsError(f"{retired} is in the way of replacing {path} and is not a checkpoint")
                shutil.rmtree(retired)
            os.replace(path, retired)  # a kill from here to the next line leaves only the retired one
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _state(module: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return module if isinstance(module, dict) else module.state_dict()


def foreign_entries(path: Path) -> list[str]:
    """What in folder ``path`` is not part of an sr_tune checkpoint (empty when it does not exist, is empty
    or holds only a checkpoint's files); a file or a link at ``path`` is foreign itself."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return [path.name]
    if not path.exists():
        return []
    names = sorted(entry.name for entry in path.iterdir())
    if (path / META_FILE).is_file() and not _written_by_sr_tune(path / META_FILE):
        return names
    return [name for name in names if name not in CHECKPOINT_FILES or (path / name).is_symlink()]


def _written_by_sr_tune(meta_file: Path) -> bool:
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format" in meta and "config" in meta


def _retired(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _put_back_after_a_killed_save(path: Path) -> None:
    """A save killed between its two renames (the old folder moved aside, the new one not yet in place) left
    the previous checkpoint aside: it goes back to ``path``."""
    retired = _retired(path)
    if not path.exists() and retired.is_dir() and not retired.is_symlink() and not foreign_entries(retired):
        os.replace(retired, path)


def has_checkpoint(path: str | Path) -> bool:
    """Whether folder ``path`` holds a checkpoint (also one a killed save left aside, put back)."""
    path = Path(path)
    _put_back_after_a_killed_save(path)
    return path.is_dir()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by ``save_checkpoint``; errors name the file at fault."""
    if not str(path).strip():
        raise InputError("the checkpoint path is empty: name a checkpoint folder (e.g. runs/fsrcnn_x2/best)")
    path = Path(path)
    path = path.resolve() if not path.name else path  # "." or "..": a folder whose name the put-back needs
    _put_back_after_a_killed_save(path)
    if path.suffix in PICKLE_SUFFIXES and not path.is_dir():
        raise InputError(
            f"{path}: pickle checkpoints are refused (loading one can run arbitrary code); "
            f"sr_tune checkpoints are folders with {WEIGHTS_FILE} and {META_FILE}"
        )
    weights, meta_file = path / WEIGHTS_FILE, path / META_FILE
    for required in (weights, meta_file):
        if not required.is_file():
            raise FileNotFoundError(f"{required}: missing; {path} is not an sr_tune checkpoint folder")
    if meta_file.stat().st_size > MAX_META_BYTES:
        raise InputError(
            f"{meta_file}: {meta_file.stat().st_size:,} bytes, more than the {MAX_META_BYTES:,} a checkpoint's "
            f"description takes; not a checkpoint sr_tune wrote"
        )
    try:
        meta: dict[str, Any] = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{meta_file}: not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{meta_file}: not a checkpoint description (a JSON object is expected)")
    if meta.get("format") not in (1, FORMAT_VERSION):
        raise InputError(f"{meta_file}: unsupported checkpoint format {meta.get('format')!r}")
    required, optional = {"step": int, "config": dict}, {"metrics": dict, "optimizers": dict, "state": dict}
    wrong = [
        f"{key}: {'missing' if key not in meta else type(meta[key]).__name__} (expected {kind.__name__})"
        for key, kind in {**required, **optional}.items()
        if (key in meta or key in required)
        and (not isinstance(meta.get(key), kind) or (kind is int and isinstance(meta.get(key), bool)))
    ]
    if wrong:
        raise InputError(f"{meta_file}: not a checkpoint sr_tune wrote: {', '.join(wrong)}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as error:  # truncated, corrupt, or not safetensors at all
        raise InputError(f"{weights}: not a readable safetensors file ({error})") from None
    return Checkpoint(
        config=TrainConfig.from_dict(meta["config"], source=str(meta_file)),
        step=int(meta["step"]),
        metrics=dict(meta.get("metrics", {})),
        tensors=tensors,
        optimizers=meta.get("optimizers", {}),  # checked above: a dict, or absent (weights only)
        run=RunState.from_json(meta.get("state", {}), meta_file),
        path=path,
    )
