"""Optimizers of a training run: parameter groups, the optimizer a config names, the lr schedule, and restoring
an optimizer's moments under this run's settings."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sr_tune.checkpoint import restore_optimizer
from sr_tune.config import OptimizerConfig
from sr_tune.errors import InputError


def parameter_groups(model: nn.Module, lr: float, last_layer_scale: float) -> list[dict[str, Any]]:
    """One group for the model's last layer (the last module owning parameters) at ``lr * last_layer_scale``,
    one for the rest at ``lr``. ``initial_lr`` is what schedules scale."""
    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    last = {id(p) for p in owners[-1].parameters(recurse=False)}
    body = [p for p in model.parameters() if id(p) not in last]
    head = [p for p in model.parameters() if id(p) in last]
    return [
        {"params": body, "lr": lr, "initial_lr": lr},
        {"params": head, "lr": lr * last_layer_scale, "initial_lr": lr * last_layer_scale},
    ]


def build_optimizer(config: OptimizerConfig, groups: Iterable[dict[str, Any]]) -> torch.optim.Optimizer:
    groups = [{**group, "params": list(group["params"])} for group in groups]
    decay = config.weight_decay
    # Adam, AdamW and SGD update each tensor in one fused kernel instead of some ten ops (benchmarks/train_step.py
    # measures the step). Torch fuses float tensors on the CPU and CUDA.
    params = [param for group in groups for param in group["params"]]
    fused = all(param.is_floating_point() and param.device.type in ("cpu", "cuda") for param in params)
    if config.name == "adam":
        return torch.optim.Adam(groups, betas=config.betas, weight_decay=decay, fused=fused)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, betas=config.betas, weight_decay=decay, fused=fused)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=config.momentum, weight_decay=decay, fused=fused)
    if config.name == "rmsprop":
        return torch.optim.RMSprop(groups, momentum=config.momentum, weight_decay=decay)
    raise ValueError(f"optimizer.name: {config.name!r} is not an optimizer (allowed: adam, adamw, sgd, rmsprop)")


def lr_factor(config: OptimizerConfig, step: int, total_steps: int) -> float:
    """Multiplier of every group's initial lr at ``step`` (1-based): warm-up, then the schedule."""
    warmup = min(1.0, step / config.warmup_steps) if config.warmup_steps else 1.0
    if config.schedule == "step":
        return warmup * config.gamma ** ((step - 1) // config.step_size)
    if config.schedule == "cosine":
        progress = min(1.0, max(0.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)))
        return warmup * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    if config.schedule == "constant":
        return warmup
    raise InputError(f"optimizer.schedule: {config.schedule!r} is not a schedule (allowed: constant, step, cosine)")


def restore_keeping_settings(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Moments and step counts from the checkpoint; lr, L2, momentum and betas from this run's config. A plain
    resume has the same settings either way; a run resumed under new ones (PBT's exploit and explore) must
    train with the new ones."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    restore_optimizer(optimizer, tensors, meta)
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)
