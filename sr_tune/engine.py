"""The training loop: sample patches, forward, loss, backward, clip, step; evaluate and checkpoint at intervals.

One loop serves PSNR-oriented models and SRGAN (a discriminator step before each generator step). No Ray
and no MLflow here: callers pass ``on_eval`` for reporting, and everything runs (and is tested) in a plain
process. Under ``torch.distributed`` (Ray Train starts it) the model is wrapped in DDP and each rank
samples its own image shard.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sr_tune.checkpoint import Checkpoint, load_checkpoint, restore_optimizer, save_checkpoint
from sr_tune.config import OptimizerConfig, TrainConfig
from sr_tune.data.augment import Augmenter
from sr_tune.data.degrade import imresize
from sr_tune.data.sampler import ImageBank, PatchSampler
from sr_tune.data.sources import open_source
from sr_tune.data.validation import ValidationPair, validation_pairs
from sr_tune.losses import SRLoss, VGGDistance, discriminator_loss
from sr_tune.metrics import psnr, ssim
from sr_tune.models import create_model
from sr_tune.models.srresnet import SRGANDiscriminator


@dataclass(frozen=True)
class Preview:
    """The first validation image at one evaluation, each (C, H, W) in [0, 1] at HR size (LR repeated)."""

    lr: torch.Tensor
    bicubic: torch.Tensor
    sr: torch.Tensor
    hr: torch.Tensor
    bicubic_psnr: float
    sr_psnr: float


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """One evaluation: training losses averaged since the last one, validation on Y with a border crop
    of ``scale`` pixels (model beside bicubic), and VGG feature distances for GAN runs."""

    step: int
    loss: float
    losses: dict[str, float]
    lr: float
    psnr: float
    ssim: float
    bicubic_psnr: float
    bicubic_ssim: float
    vgg: dict[str, float] = field(default_factory=dict)
    patches_per_second: float
    seconds: float
    preview: Preview | None = field(default=None, compare=False, repr=False)

    def metrics(self) -> dict[str, float]:
        """Flat metric names as reported to Ray and MLflow."""
        values = {"loss": self.loss, "lr": self.lr, "val_psnr": self.psnr, "val_ssim": self.ssim,
                  "bicubic_psnr": self.bicubic_psnr, "bicubic_ssim": self.bicubic_ssim,
                  "psnr_gain": self.psnr - self.bicubic_psnr, "patches_per_second": self.patches_per_second}  # fmt: skip
        values.update({f"loss_{name}": value for name, value in self.losses.items()})
        values.update({f"val_{name}": value for name, value in self.vgg.items()})
        return values

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "preview"}


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    history: list[EvalResult]
    last_checkpoint: Path | None
    best_checkpoint: Path | None

    @property
    def final(self) -> EvalResult:
        return self.history[-1]

    @property
    def best(self) -> EvalResult:
        return max(self.history, key=lambda result: result.psnr)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"training.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def parameter_groups(model: nn.Module, lr: float, last_layer_scale: float) -> list[dict[str, Any]]:
    """One group for the model's last layer (the last module owning parameters) at ``lr * last_layer_scale``,
    one for the rest at ``lr``. ``initial_lr`` is what schedules scale."""
    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    last = {id(p) for p in owners[-1].parameters(recurse=False)}
    body = [p for p in model.parameters() if id(p) not in last]
    head = [p for p in model.parameters() if id(p) in last]
    return [{"params": body, "lr": lr, "initial_lr": lr},
            {"params": head, "lr": lr * last_layer_scale, "initial_lr": lr * last_layer_scale}]  # fmt: skip


def build_optimizer(config: OptimizerConfig, groups: Iterable[dict[str, Any]]) -> torch.optim.Optimizer:
    groups = list(groups)
    if config.name == "adam":
        return torch.optim.Adam(groups, betas=config.betas, weight_decay=config.weight_decay)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, betas=config.betas, weight_decay=config.weight_decay)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.RMSprop(groups, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor(config: OptimizerConfig, step: int, total_steps: int) -> float:
    """Multiplier of every group's initial lr at ``step`` (1-based): warm-up, then the schedule."""
    warmup = min(1.0, step / config.warmup_steps) if config.warmup_steps else 1.0
    if config.schedule == "step":
        return warmup * config.gamma ** ((step - 1) // config.step_size)
    if config.schedule == "cosine":
        progress = min(1.0, max(0.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)))
        return warmup * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return warmup


def _restore_state_keep_settings(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                                 meta: dict[str, Any]) -> None:  # fmt: skip
    """Moments and step counts from the checkpoint; lr, L2, momentum and betas from this run's config. A plain
    resume has the same settings either way; a run resumed under new ones (PBT's exploit and explore) must
    train with the new ones."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    restore_optimizer(optimizer, tensors, meta)
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)


def load_initial_weights(model: nn.Module, path: str | Path, reinit: Sequence[str] = ()) -> list[str]:
    """Load checkpoint ``path``'s weights into ``model`` for fine-tuning; return the names left as initialised.

    Parameters whose names start with a ``reinit`` prefix may be missing or differ in shape (e.g. the
    upsampler of another scale) and keep their fresh initialisation; any other mismatch is an error that
    lists every layer that did not fit.
    """
    source = load_checkpoint(path).model_state
    target = model.state_dict()
    mismatched = {k: f"{k}: checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)}"
                  for k, v in source.items() if k in target and v.shape != target[k].shape}  # fmt: skip
    mismatched |= {k: f"{k}: not in the checkpoint" for k in target if k not in source}
    mismatched |= {k: f"{k}: in the checkpoint, not in the model" for k in source if k not in target}
    problems = [text for key, text in sorted(mismatched.items()) if not key.startswith(tuple(reinit))]
    if problems:
        raise ValueError(
            f"{path}: {len(problems)} weight(s) do not fit this model (re-initialise them on purpose with "
            f"training.init_reinit=[prefix, ...]):\n  - " + "\n  - ".join(problems)
        )
    model.load_state_dict({k: v for k, v in source.items() if k not in mismatched}, strict=False)
    return sorted(k for k in mismatched if k in target)


@torch.no_grad()
def evaluate(
    model: nn.Module, pairs: Sequence[ValidationPair], scale: int, vgg: VGGDistance | None = None
) -> tuple[dict[str, float], dict[str, float], Preview]:
    """Mean PSNR/SSIM on Y (border crop = scale) of the model and of bicubic; VGG distances when given."""
    was_training = model.training
    model.eval()
    totals = {"psnr": 0.0, "ssim": 0.0, "bicubic_psnr": 0.0, "bicubic_ssim": 0.0}
    distances: dict[str, float] = {}
    preview = None
    for pair in pairs:  # lr (1, C, h, w), hr (1, C, h*s, w*s)
        sr = model(pair.lr).float().clamp(0, 1)
        bicubic = imresize(pair.lr, scale=scale).clamp(0, 1)
        scores = {}
        for prefix, output in (("", sr), ("bicubic_", bicubic)):
            scores[f"{prefix}psnr"] = psnr(output, pair.hr, crop_border=scale, y_channel=True).item()
            scores[f"{prefix}ssim"] = ssim(output, pair.hr, crop_border=scale, y_channel=True).item()
        totals = {key: value + scores[key] for key, value in totals.items()}
        if vgg is not None:
            for name, value in vgg(sr, pair.hr).items():
                distances[name] = distances.get(name, 0.0) + value.item() / len(pairs)
        if preview is None:
            nearest = pair.lr.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
            preview = Preview(lr=nearest[0].cpu(), bicubic=bicubic[0].cpu(), sr=sr[0].cpu(), hr=pair.hr[0].cpu(),
                              bicubic_psnr=scores["bicubic_psnr"], sr_psnr=scores["psnr"])  # fmt: skip
    model.train(was_training)
    assert preview is not None, "validation needs at least one image"
    return {key: value / len(pairs) for key, value in totals.items()}, distances, preview


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def _raise_if_not_finite(step: int, terms: dict[str, torch.Tensor]) -> None:
    bad = {name: value.item() for name, value in terms.items() if not math.isfinite(value.item())}
    if bad:
        described = ", ".join(f"{name} = {value}" for name, value in bad.items())
        raise FloatingPointError(f"step {step}: loss term {described} is not finite; lower optimizer.lr "
                                 f"or set optimizer.grad_clip_norm")  # fmt: skip


def train(
    config: TrainConfig,
    *,
    on_eval: Callable[[EvalResult, Path | None], bool | None] = lambda result, checkpoint: None,
    checkpoint_dir: Path | None = None,
    resume: Checkpoint | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    extra_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``config``'s model, from scratch, from ``training.init_from`` weights, or resuming ``resume``.

    Every ``eval_interval`` steps (and at the end) it evaluates, writes ``checkpoint_dir/last`` (and
    ``best`` when validation PSNR improved) on rank 0, then calls ``on_eval(result, last_or_None)``; a true
    return value ends training there (every rank must return the same). ``extra_state`` (JSON) is stored in each ``last`` checkpoint, e.g. the tracking run to continue.
    """
    data, training, scale, loss_config = config.data, config.training, config.model.scale, config.loss
    device = device or resolve_device(training.device)
    on_cuda = device.type == "cuda"
    torch.manual_seed(training.seed)  # the same initial weights on every rank

    # Data: this rank's shard of the training images on the device; validation pairs by the benchmark protocol.
    train_images = open_source(data.train, "train", skip_bad=data.skip_bad, rank=rank, world_size=world_size)
    augmenter = Augmenter(strength=data.augment_strength, flip_rot=data.flip_rot, color_jitter=data.color_jitter)
    sampler = PatchSampler(ImageBank([image.hr for image in train_images], device), scale=scale,
                           lr_patch_size=data.lr_patch_size, batch_size=data.batch_size, color=data.color,
                           blur_sigma=data.blur_sigma, augmenter=augmenter, seed=training.seed, rank=rank)  # fmt: skip
    val_pairs = validation_pairs(open_source(data.val, "val", skip_bad=data.skip_bad), scale=scale, color=data.color,
                                 crop=data.val_crop, blur_sigma=data.blur_sigma, device=device)  # fmt: skip

    # Networks, optimizers and losses.
    model = create_model(config.model.name, scale=scale, in_channels=config.in_channels, **config.model.kwargs)
    if training.init_from and resume is None:
        load_initial_weights(model, training.init_from, training.init_reinit)
    memory_format = torch.channels_last if on_cuda and training.channels_last else torch.preserve_format
    model = model.to(device, memory_format=memory_format).train()
    ema = copy.deepcopy(model).requires_grad_(False) if config.optimizer.ema_decay > 0 else None
    optimizer = build_optimizer(config.optimizer, parameter_groups(model, config.optimizer.lr,
                                                                   config.optimizer.last_layer_lr_scale))  # fmt: skip
    loss_fn = SRLoss(loss_config).to(device)
    discriminator = d_optimizer = vgg = None
    if loss_fn.adversarial:
        discriminator = SRGANDiscriminator(in_channels=config.in_channels).to(device, memory_format=memory_format)
        d_lr = config.optimizer.discriminator_lr or config.optimizer.lr
        d_optimizer = build_optimizer(config.optimizer, [{"params": list(discriminator.parameters()), "lr": d_lr,
                                                          "initial_lr": d_lr}])  # fmt: skip
        vgg = VGGDistance().to(device)

    history: list[EvalResult] = []
    first_step = 1
    if resume is not None:
        model.load_state_dict(resume.group("model"))
        _restore_state_keep_settings(optimizer, resume.group("optimizer"), resume.state["optimizers"]["optimizer"])
        if ema is not None:
            ema.load_state_dict(resume.group("ema"))
        if discriminator is not None and d_optimizer is not None:
            discriminator.load_state_dict(resume.group("discriminator"))
            _restore_state_keep_settings(d_optimizer, resume.group("d_optimizer"),
                                         resume.state["optimizers"]["d_optimizer"])
        torch.set_rng_state(resume.group("rng")["torch"])
        history = [EvalResult(**entry) for entry in resume.state["history"]]
        first_step = resume.step + 1

    net = model
    if world_size > 1 and dist.is_initialized():  # gradients averaged across ranks
        net = DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
        if discriminator is not None:
            discriminator = DistributedDataParallel(discriminator, device_ids=[device.index] if on_cuda else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and training.bf16 else nullcontext()
    optimizers = [o for o in (optimizer, d_optimizer) if o is not None]
    best_psnr = max((r.psnr for r in history), default=-math.inf)
    last_path = best_path = None
    sums: dict[str, torch.Tensor] = {}  # loss terms summed on the device: no host sync per step and term
    window_start, window_patches = time.perf_counter(), 0
    eval_model = ema if ema is not None else model

    for step in range(first_step, training.steps + 1):
        factor = lr_factor(config.optimizer, step, training.steps)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor

        lr_batch, hr = sampler.batch(step)  # (B, C, p, p), (B, C, p*s, p*s) on the device
        if on_cuda and training.channels_last:
            lr_batch = lr_batch.contiguous(memory_format=torch.channels_last)
        with autocast:
            sr = net(lr_batch).float()  # (B, C, p*s, p*s)

        d_real = d_fake = None
        if discriminator is not None and d_optimizer is not None:
            # Discriminator step on HR vs the generator's detached output, one forward for both halves.
            with autocast:
                logits = discriminator(torch.cat([hr, sr.detach()])).float()  # (2B,)
            d_loss = discriminator_loss(loss_config.adversarial, *logits.chunk(2))
            _raise_if_not_finite(step, {"discriminator": d_loss})
            d_optimizer.zero_grad(set_to_none=True)
            d_loss.backward()
            d_optimizer.step()
            sums["discriminator"] = sums.get("discriminator", 0.0) + d_loss.detach().double()
            # Generator step: gradients flow through D into SR only, so D's parameters are frozen meanwhile.
            critic = _unwrap(discriminator).requires_grad_(False)
            with autocast:
                d_fake = critic(sr).float()
                d_real = critic(hr).float().detach()
            critic.requires_grad_(True)

        terms = loss_fn(sr, hr, d_real, d_fake)
        loss = sum(terms.values())
        if not math.isfinite(loss.item()):
            _raise_if_not_finite(step, terms)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optimizer.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
        optimizer.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - config.optimizer.ema_decay)
                for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
                    ema_buffer.copy_(buffer)

        sums["total"] = sums.get("total", 0.0) + loss.detach().double()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().double()
        window_patches += data.batch_size
        if step % training.eval_interval != 0 and step != training.steps:
            continue

        steps_in_window = step - (history[-1].step if history else first_step - 1)
        names = sorted(sums)
        totals = torch.stack([sums[name] for name in names])
        if world_size > 1 and dist.is_initialized():  # report losses averaged over every rank's patches
            dist.all_reduce(totals)
            totals /= world_size
        window = dict(zip(names, totals.tolist()))
        scores, distances, preview = evaluate(eval_model, val_pairs, scale, vgg)
        now = time.perf_counter()
        result = EvalResult(
            step=step,
            loss=window.pop("total") / steps_in_window,
            losses={name: value / steps_in_window for name, value in window.items()},
            lr=optimizer.param_groups[0]["lr"],
            vgg=distances,
            patches_per_second=window_patches / (now - window_start),
            seconds=(history[-1].seconds if history else 0.0) + now - window_start,
            preview=preview,
            **scores,
        )
        history.append(result)
        if checkpoint_dir is not None and rank == 0:
            modules = {name: _unwrap(module) for name, module in (("ema", ema), ("discriminator", discriminator))
                       if module is not None}  # fmt: skip
            named_optimizers = {"optimizer": optimizer, **({"d_optimizer": d_optimizer} if d_optimizer else {})}
            last_path = save_checkpoint(
                Path(checkpoint_dir) / "last", model=model, config=config, step=step, metrics=result.metrics(),
                modules=modules, optimizers=named_optimizers,
                state={**(extra_state or {}), "history": [r.to_dict() for r in history]},
            )  # fmt: skip
            if result.psnr > best_psnr:
                best_path = save_checkpoint(Path(checkpoint_dir) / "best", model=eval_model, config=config,
                                            step=step, metrics=result.metrics())  # fmt: skip
        best_psnr = max(best_psnr, result.psnr)
        if on_eval(result, last_path if rank == 0 else None):  # the caller stops the run (e.g. a sweep's scheduler)
            break
        sums, window_start, window_patches = {}, time.perf_counter(), 0

    if checkpoint_dir is not None and best_path is None and (Path(checkpoint_dir) / "best").is_dir():
        best_path = Path(checkpoint_dir) / "best"  # a resumed run whose best came before the resume
    return TrainResult(history=history, last_checkpoint=last_path, best_checkpoint=best_path)
