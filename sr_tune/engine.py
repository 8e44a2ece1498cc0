"""The training loop: sample patches, forward, loss, backward, clip, step; evaluate at intervals.

No Ray and no MLflow here: callers pass an ``on_eval`` callback for reporting, and everything runs
(and is tested) in a plain process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sr_tune.checkpoint import save_checkpoint
from sr_tune.config import LossConfig, OptimizerConfig, TrainConfig
from sr_tune.data.augment import Augmenter
from sr_tune.data.degrade import imresize
from sr_tune.data.sampler import ImageBank, PatchSampler
from sr_tune.data.sources import open_source
from sr_tune.data.validation import ValidationPair, validation_pairs
from sr_tune.metrics import psnr, ssim
from sr_tune.models import create_model


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """Validation on Y with a border crop of ``scale`` pixels, model beside bicubic."""

    step: int
    loss: float
    psnr: float
    ssim: float
    bicubic_psnr: float
    bicubic_ssim: float
    patches_per_second: float


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    history: list[EvalResult]
    checkpoint: Path | None

    @property
    def final(self) -> EvalResult:
        return self.history[-1]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"training.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def build_optimizer(config: OptimizerConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.name == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.RMSprop(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def pixel_loss(config: LossConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if config.pixel == "mse":
        return F.mse_loss
    if config.pixel == "l1":
        return F.l1_loss
    eps2 = config.charbonnier_eps**2
    return lambda sr, hr: torch.sqrt((sr - hr).pow(2) + eps2).mean()


@torch.no_grad()
def evaluate(model: nn.Module, pairs: Sequence[ValidationPair], scale: int) -> dict[str, float]:
    """Mean PSNR/SSIM on Y (border crop = scale) of the model and of bicubic over validation pairs."""
    was_training = model.training
    model.eval()
    totals = {"psnr": 0.0, "ssim": 0.0, "bicubic_psnr": 0.0, "bicubic_ssim": 0.0}
    for pair in pairs:  # lr (1, C, h, w), hr (1, C, h*s, w*s)
        sr = model(pair.lr).clamp(0, 1)
        bicubic = imresize(pair.lr, scale=scale).clamp(0, 1)
        for prefix, output in (("", sr), ("bicubic_", bicubic)):
            totals[f"{prefix}psnr"] += psnr(output, pair.hr, crop_border=scale, y_channel=True).item()
            totals[f"{prefix}ssim"] += ssim(output, pair.hr, crop_border=scale, y_channel=True).item()
    model.train(was_training)
    return {key: value / len(pairs) for key, value in totals.items()}


def train(
    config: TrainConfig,
    *,
    on_eval: Callable[[EvalResult], None] = lambda result: None,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Train ``config``'s model from scratch; evaluate every ``eval_interval`` steps and at the end."""
    data, training, scale = config.data, config.training, config.model.scale
    device = resolve_device(training.device)
    torch.manual_seed(training.seed)

    bank = ImageBank([image.hr for image in open_source(data.train, "train", skip_bad=data.skip_bad)], device)
    augmenter = Augmenter(strength=data.augment_strength, flip_rot=data.flip_rot, color_jitter=data.color_jitter)
    sampler = PatchSampler(bank, scale=scale, lr_patch_size=data.lr_patch_size, batch_size=data.batch_size,
                           color=data.color, blur_sigma=data.blur_sigma, augmenter=augmenter,
                           seed=training.seed)  # fmt: skip
    val_pairs = validation_pairs(open_source(data.val, "val", skip_bad=data.skip_bad), scale=scale,
                                 color=data.color, crop=data.val_crop, blur_sigma=data.blur_sigma,
                                 device=device)  # fmt: skip

    model = create_model(config.model.name, scale=scale, in_channels=config.in_channels, **config.model.kwargs)
    model = model.to(device).train()
    optimizer = build_optimizer(config.optimizer, list(model.parameters()))
    loss_fn = pixel_loss(config.loss)

    history: list[EvalResult] = []
    running_loss, window_start, window_patches = 0.0, time.perf_counter(), 0
    for step in range(1, training.steps + 1):
        lr, hr = sampler.batch(step)  # (B, C, P/s, P/s), (B, C, P, P) on the device

        sr = model(lr)
        loss = config.loss.pixel_weight * loss_fn(sr, hr)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"step {step}: pixel loss is {loss.item()}; lower optimizer.lr?")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optimizer.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
        optimizer.step()

        running_loss += loss.item()
        window_patches += data.batch_size
        if step % training.eval_interval == 0 or step == training.steps:
            elapsed = time.perf_counter() - window_start
            steps_in_window = step - (history[-1].step if history else 0)
            result = EvalResult(
                step=step,
                loss=running_loss / steps_in_window,
                patches_per_second=window_patches / elapsed,
                **evaluate(model, val_pairs, scale),
            )
            history.append(result)
            on_eval(result)
            running_loss, window_start, window_patches = 0.0, time.perf_counter(), 0

    checkpoint = None
    if checkpoint_dir is not None:
        metrics = {"val_psnr": history[-1].psnr, "val_ssim": history[-1].ssim}
        checkpoint = save_checkpoint(checkpoint_dir, model=model, config=config, step=training.steps, metrics=metrics)
    return TrainResult(history=history, checkpoint=checkpoint)
