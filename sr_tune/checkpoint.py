"""Checkpoints: a folder with ``weights.safetensors`` (tensors only) and ``checkpoint.json``.

``checkpoint.json`` holds the full ``TrainConfig``, the step and the last metrics, so a checkpoint alone
rebuilds its model. Loading never unpickles: pickle files (``.pt``, ``.pth``, ``.ckpt``) are refused.
Writes go to a temporary sibling folder that is renamed into place, so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sr_tune.config import TrainConfig
from sr_tune.models import create_model

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "checkpoint.json"
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    config: TrainConfig
    step: int
    metrics: dict[str, float]
    model_state: dict[str, torch.Tensor]

    def build_model(self) -> nn.Module:
        """The checkpoint's network with its weights loaded, in eval mode."""
        model = create_model(
            self.config.model.name,
            scale=self.config.model.scale,
            in_channels=self.config.in_channels,
            **self.config.model.kwargs,
        )
        model.load_state_dict(self.model_state)
        return model.eval()


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: TrainConfig,
    step: int,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write ``model``'s weights and the run's config atomically to folder ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_VERSION, "step": step, "metrics": metrics or {}, "config": config.to_dict()}
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, staging / WEIGHTS_FILE)
        (staging / META_FILE).write_text(json.dumps(meta, indent=2))
        if path.exists():
            retired = path.with_name(f".{path.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by ``save_checkpoint``; errors name the file at fault."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt", ".pkl", ".bin"):
        raise ValueError(
            f"{path}: pickle checkpoints are refused (loading one can run arbitrary code); "
            f"sr_tune checkpoints are folders with {WEIGHTS_FILE} and {META_FILE}"
        )
    weights, meta_file = path / WEIGHTS_FILE, path / META_FILE
    for required in (weights, meta_file):
        if not required.is_file():
            raise FileNotFoundError(f"{required}: missing; {path} is not an sr_tune checkpoint folder")
    try:
        meta: dict[str, Any] = json.loads(meta_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_file}: not valid JSON ({error})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: unsupported checkpoint format {meta.get('format')!r}")
    tensors = load_file(weights)
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    return Checkpoint(
        config=TrainConfig.from_dict(meta["config"], source=str(meta_file)),
        step=int(meta["step"]),
        metrics=dict(meta.get("metrics", {})),
        model_state=model_state,
    )
