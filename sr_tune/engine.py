"""The training loop: sample patches, forward, loss, backward, clip, step; evaluate and checkpoint at intervals.

One loop serves PSNR-oriented models and SRGAN (a discriminator step before each generator step). No Ray
and no MLflow here: callers pass ``on_eval`` for reporting, and everything runs (and is tested) in a plain
process. Under ``torch.distributed`` (Ray Train starts it) the model is wrapped in DDP and each rank
samples its own image shard.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import operator
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sr_tune.checkpoint import Checkpoint, RunState, load_checkpoint, save_checkpoint
from sr_tune.config import TrainConfig
from sr_tune.data.augment import Augmenter
from sr_tune.data.degrade import imresize
from sr_tune.data.sampler import ImageBank, PatchSampler
from sr_tune.data.sources import large_enough, open_source
from sr_tune.data.validation import ValidationPair, protocol_scores, validation_pairs
from sr_tune.delta_stn import plain_parameters
from sr_tune.losses import SRLoss, VGGDistance, discriminator_loss
from sr_tune.metrics import ycbcr_to_rgb
from sr_tune.models import create_model
from sr_tune.models.srresnet import SRGANDiscriminator
from sr_tune.online_tuning import OnlineTuner
from sr_tune.optim import build_optimizer, lr_factor, parameter_groups, restore_keeping_settings
from sr_tune.results import EvalResult, Preview


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


def load_initial_weights(model: nn.Module, path: str | Path, reinit: Sequence[str] = ()) -> list[str]:
    """Load checkpoint ``path``'s weights into ``model`` for fine-tuning; return the names left as initialised.

    Parameters whose names start with a ``reinit`` prefix may be missing or differ in shape (e.g. the
    upsampler of another scale) and keep their fresh initialisation; any other mismatch is an error that
    lists every layer that did not fit.
    """
    source = load_checkpoint(path).model_state
    target = model.state_dict()
    mismatched = {
        k: f"{k}: checkpoint {tuple(v.shape)}, model {tuple(target[k].shape)}"
        for k, v in source.items()
        if k in target and v.shape != target[k].shape
    }
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
    model: nn.Module,
    pairs: Sequence[ValidationPair],
    scale: int,
    vgg: VGGDistance | None = None,
    *,
    eight_bit: bool = False,
) -> tuple[dict[str, float], dict[str, float], Preview]:
    """Mean PSNR/SSIM on Y (border crop = scale) of the model and of bicubic; VGG distances when given.
    ``eight_bit``: both outputs rounded to 8-bit levels first, as a saved image would be."""
    was_training = model.training
    model.eval()
    totals = {"psnr": 0.0, "ssim": 0.0, "bicubic_psnr": 0.0, "bicubic_ssim": 0.0}
    distances: dict[str, float] = {}
    preview = None
    for pair in pairs:  # lr (1, C, h, w), hr (1, C, h*s, w*s)
        scores, sr, bicubic = protocol_scores(model(pair.lr), pair, scale, eight_bit=eight_bit)
        totals = {key: value + scores[key] for key, value in totals.items()}
        if vgg is not None:
            for name, value in vgg(sr, pair.hr).items():
                distances[name] = distances.get(name, 0.0) + value.item() / len(pairs)
        if preview is None:
            preview = _preview(pair, sr, bicubic, scale, scores)
    model.train(was_training)
    assert preview is not None, "validation needs at least one image"
    return {key: value / len(pairs) for key, value in totals.items()}, distances, preview


def _preview(pair: ValidationPair, sr: torch.Tensor, bicubic: torch.Tensor, scale: int, scores: dict) -> Preview:
    """The pair's tiles in colour, on the CPU: (1, C, H, W) outputs -> RGB (3, H, W)."""

    def nearest(image: torch.Tensor) -> torch.Tensor:
        return image.repeat_interleave(scale, -2).repeat_interleave(scale, -1)

    def colour(image: torch.Tensor, chroma: torch.Tensor | None) -> torch.Tensor:
        rgb = image if chroma is None else ycbcr_to_rgb(torch.cat([image, chroma], dim=1))
        return rgb[0].clamp(0, 1).cpu()

    chroma = imresize(pair.chroma, scale=scale) if pair.chroma is not None else None
    return Preview(
        lr=colour(nearest(pair.lr), nearest(pair.chroma) if pair.chroma is not None else None),
        bicubic=colour(bicubic, chroma),
        sr=colour(sr, chroma),
        hr=colour(pair.hr, chroma),
        bicubic_psnr=scores["bicubic_psnr"],
        sr_psnr=scores["psnr"],
    )


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


@dataclass(frozen=True)
class Gan:
    """The SRGAN side of an adversarial run, built once: the discriminator (DDP-wrapped under
    ``torch.distributed``), its optimizer and loss, and the VGG distances reported at validation."""

    discriminator: nn.Module
    optimizer: torch.optim.Optimizer
    loss_kind: str
    vgg: VGGDistance


def build_gan(config: TrainConfig, device: torch.device, memory_format: torch.memory_format) -> Gan | None:
    if config.loss.adversarial == "none":
        return None
    discriminator = SRGANDiscriminator(in_channels=config.in_channels).to(device, memory_format=memory_format)
    lr = config.optimizer.discriminator_lr or config.optimizer.lr
    optimizer = build_optimizer(
        config.optimizer, [{"params": list(discriminator.parameters()), "lr": lr, "initial_lr": lr}]
    )
    return Gan(discriminator, optimizer, config.loss.adversarial, VGGDistance().to(device))


def discriminator_step(
    gan: Gan, hr: torch.Tensor, sr: torch.Tensor, autocast: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One discriminator update on HR vs the generator's detached output (one forward for both halves),
    then the logits the generator's adversarial loss needs: (D loss, D(HR) detached, D(SR)), each (B,)
    but the scalar loss. Gradients of D(SR) flow into SR only: D's parameters are frozen meanwhile."""
    with autocast:
        logits = gan.discriminator(torch.cat([hr, sr.detach()])).float()  # (2B,)
    loss = discriminator_loss(gan.loss_kind, *logits.chunk(2))
    gan.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gan.optimizer.step()
    critic = _unwrap(gan.discriminator).requires_grad_(False)
    with autocast:
        d_fake = critic(sr).float()
        d_real = critic(hr).float().detach()
    critic.requires_grad_(True)
    return loss.detach(), d_real, d_fake


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA's decay at ``step`` (1-based): min(decay, (1 + step) / (10 + step)). Early on the average follows
    the model closely; a fixed 0.999 would still hold a third of the random initial weights at step 400, so a
    short run or an early ASHA rung would score the initialisation rather than the training."""
    return min(decay, (1 + step) / (10 + step))


@dataclass(frozen=True)
class EmaUpdate:
    """The EMA's tensors and the model's that they follow, listed once: listing them costs about 0.1 ms, which
    every step would pay again."""

    averages: list[torch.Tensor]
    parameters: list[torch.Tensor]  # the model's (the general ones of a Delta-STN model)
    buffer_copies: list[torch.Tensor]
    buffers: list[torch.Tensor]

    @classmethod
    def of(cls, ema: nn.Module, model: nn.Module) -> EmaUpdate:
        return cls(list(ema.parameters()), plain_parameters(model), list(ema.buffers()), list(model.buffers()))

    @torch.no_grad()
    def __call__(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * model for parameters; buffers copied."""
        torch._foreach_lerp_(self.averages, self.parameters, 1 - decay)
        for ema_buffer, buffer in zip(self.buffer_copies, self.buffers):
            ema_buffer.copy_(buffer)


class LossWindow:
    """The loss terms of the steps since the last evaluation, each step's kept as they are (detached, on the
    device: no op and no host sync per step), stacked and read once per evaluation by ``close``."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.values: list[torch.Tensor] = []  # 0-d, T per step: those of step first_step + k from k * T on
        self.first_step = 0
        self.patches = 0
        self.started = time.perf_counter()

    def add(self, step: int, terms: dict[str, torch.Tensor], patches: int) -> None:
        if not self.values:
            self.names, self.first_step = list(terms), step
        self.values.extend(value.detach() for value in terms.values())
        self.patches += patches

    def close(self, steps: int, world_size: int) -> tuple[dict[str, float], float]:
        """Mean of each term per step (over every rank under ``torch.distributed``) and patches per second;
        raises ``FloatingPointError`` naming the first step and term that was not finite on this rank."""
        rows = torch.stack(self.values).double().view(-1, len(self.names))  # (steps, T)
        finite = torch.isfinite(rows).all(1)  # (steps,)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            values = dict(zip(self.names, rows[first].tolist()))
            bad = {name: value for name, value in values.items() if name != "total" and not math.isfinite(value)}
            bad = bad or {"total": values["total"]}  # finite terms whose sum overflowed
            described = ", ".join(f"{name} = {value}" for name, value in bad.items())
            raise FloatingPointError(
                f"step {self.first_step + first}: loss term {described} is not finite; lower optimizer.lr or set "
                f"optimizer.grad_clip_norm"
            )
        totals = rows.sum(0)  # (T,)
        if world_size > 1 and dist.is_initialized():  # losses averaged over every rank's patches
            dist.all_reduce(totals)
            totals /= world_size
        seconds = time.perf_counter() - self.started
        return {name: total / steps for name, total in zip(self.names, totals.tolist())}, self.patches / seconds


def build_data(
    config: TrainConfig, device: torch.device, rank: int, world_size: int
) -> tuple[PatchSampler, list[ValidationPair]]:
    """This rank's shard of the training images on the device behind a patch sampler, and the validation
    pairs by the benchmark protocol."""
    data, scale = config.data, config.model.scale
    train_images = open_source(data.train, "train", skip_bad=data.skip_bad, rank=rank, world_size=world_size)
    tuned = config.delta_stn.augment_strength if config.delta_stn.enabled else ()
    # A tuned strength: warps up to its upper bound, each patch at its own strength below it.
    strength = tuned[2] if tuned else data.augment_strength
    augmenter = Augmenter(strength=strength, flip_rot=data.flip_rot, color_jitter=data.color_jitter)
    hr_size = data.lr_patch_size * scale
    crop_size = augmenter.crop_size(hr_size)
    why = f"the {crop_size}px crop a {hr_size}px HR patch needs" + (
        f" (with room for warps at augment_strength {strength})" if crop_size > hr_size else ""
    )
    train_images = large_enough(train_images, crop_size, why=why, skip_bad=data.skip_bad, source=data.train)
    sampler = PatchSampler(
        ImageBank([image.hr for image in train_images], device, luma=data.color == "y" and not augmenter.warps),
        scale=scale,
        lr_patch_size=data.lr_patch_size,
        batch_size=data.batch_size,
        color=data.color,
        blur_sigma=data.blur_sigma,
        quantize_lr=data.quantize_lr,
        augmenter=augmenter,
        seed=config.training.seed,
        rank=rank,
    )
    val_pairs = validation_pairs(
        open_source(data.val, "val", skip_bad=data.skip_bad),
        scale=scale,
        color=data.color,
        crop=data.val_crop,
        blur_sigma=data.blur_sigma,
        quantize_lr=data.quantize_lr,
        device=device,
    )
    return sampler, val_pairs


def _ddp(module: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``module`` wrapped in DDP when this is one of several ranks, else as it is."""
    if world_size > 1 and dist.is_initialized():
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def _restore(
    resume: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, ema: nn.Module | None, gan: Gan | None
) -> tuple[list[EvalResult], int]:
    """Load a ``last`` checkpoint's weights and optimizer moments; returns its history and next step."""
    model.load_state_dict(resume.group("model"))
    restore_keeping_settings(optimizer, resume.group("optimizer"), resume.optimizers["optimizer"])
    if ema is not None:
        ema.load_state_dict(resume.group("ema"))
    if gan is not None:
        _unwrap(gan.discriminator).load_state_dict(resume.group("discriminator"))
        restore_keeping_settings(gan.optimizer, resume.group("d_optimizer"), resume.optimizers["d_optimizer"])
    return list(resume.run.history), resume.step + 1


def _save_checkpoints(
    folder: Path,
    config: TrainConfig,
    result: EvalResult,
    history: list[EvalResult],
    *,
    model: nn.Module,
    ema: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    gan: Gan | None,
    tuner: OnlineTuner | None,
    improved: bool,
    mlflow_run_id: str | None,
) -> tuple[Path, Path | None]:
    """``folder/last`` (everything a resume needs) and, when validation improved, ``folder/best`` (the
    weights used for evaluation). Both hold the plain model: a Delta-STN run keeps its own state beside it."""
    modules = {"ema": ema.state_dict()} if ema is not None else {}
    optimizers = {"optimizer": optimizer}
    if gan is not None:
        modules["discriminator"] = _unwrap(gan.discriminator).state_dict()
        optimizers["d_optimizer"] = gan.optimizer
    plain = model.state_dict()
    if tuner is not None:
        plain = tuner.net.plain_state_dict()
        modules |= tuner.modules()
        optimizers |= tuner.optimizers
    last = save_checkpoint(
        folder / "last",
        model=plain,
        config=config,
        step=result.step,
        metrics=result.metrics(),
        modules=modules,
        optimizers=optimizers,
        run=RunState(tuple(history), mlflow_run_id),
    )
    best = None
    if improved:
        best = save_checkpoint(
            folder / "best",
            model=ema.state_dict() if ema is not None else plain,
            config=config,
            step=result.step,
            metrics=result.metrics(),
        )
    return last, best


def train(
    config: TrainConfig,
    *,
    on_eval: Callable[[EvalResult, Path | None], bool | None] = lambda result, checkpoint: None,
    checkpoint_dir: Path | None = None,
    resume: Checkpoint | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    mlflow_run_id: str | None = None,
    threads: Callable[[], int] | None = None,
) -> TrainResult:
    """Train ``config``'s model, from scratch, from ``training.init_from`` weights, or resuming ``resume``.

    Every ``eval_interval`` steps (and at the end) it evaluates, writes ``checkpoint_dir/last`` (and
    ``best`` when validation PSNR improved) on rank 0, then calls ``on_eval(result, last_or_None)``; a true
    return value ends training there (every rank must return the same). ``mlflow_run_id`` is stored in
    each ``last`` checkpoint: the tracking run a resume continues. ``threads``, asked before every step, says how
    many CPU threads the steps from there on may use (a sweep's last trials take over the CPUs of ended ones).
    """
    data, training, opt_config, scale = config.data, config.training, config.optimizer, config.model.scale
    device = device or resolve_device(training.device)
    on_cuda = device.type == "cuda"
    torch.manual_seed(training.seed)  # the same initial weights on every rank

    sampler, val_pairs = build_data(config, device, rank, world_size)

    # Networks, optimizers and losses.
    model = create_model(config.model.name, scale=scale, in_channels=config.in_channels, **config.model.kwargs)
    if training.init_from and resume is None:
        load_initial_weights(model, training.init_from, training.init_reinit)
    channels_last = on_cuda and training.channels_last
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = model.to(device, memory_format=memory_format).train()
    ema = copy.deepcopy(model).requires_grad_(False) if opt_config.ema_decay > 0 else None
    optimizer = build_optimizer(opt_config, parameter_groups(model, opt_config.lr, opt_config.last_layer_lr_scale))
    loss_fn = SRLoss(config.loss).to(device)
    gan = build_gan(config, device, memory_format)
    history, first_step = _restore(resume, model, optimizer, ema, gan) if resume else ([], 1)
    tuner = None
    if config.delta_stn.enabled:  # the model responds to its hyperparameters from here on (in place)
        tuner = OnlineTuner.build(config, model, optimizer, sampler, rank=rank, world_size=world_size)
        if resume is not None:
            tuner.restore(resume)
    if resume is not None:  # last: building the run (a Delta-STN model's response weights) draws numbers
        torch.set_rng_state(resume.group("rng")["torch"])
    net = _ddp(model, device, world_size) if tuner is None else model  # DDP averages gradients across ranks
    net = torch.compile(net) if on_cuda and training.compile and tuner is None else net
    gan = dataclasses.replace(gan, discriminator=_ddp(gan.discriminator, device, world_size)) if gan else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda and training.bf16 else nullcontext()
    optimizers = [optimizer, *([gan.optimizer] if gan else []), *([tuner.stn.response_optimizer] if tuner else [])]
    ema_update = EmaUpdate.of(ema, model) if ema is not None else None
    eval_model = ema if ema is not None else model
    best_psnr = max((r.psnr for r in history), default=-math.inf)
    last_path = best_path = None
    window = LossWindow()

    factor = math.nan
    for step in range(first_step, training.steps + 1):
        if threads is not None and (wanted := threads()) != torch.get_num_threads():
            torch.set_num_threads(wanted)
        step_factor = lr_factor(opt_config, step, training.steps)
        if step_factor != factor:  # a constant lr is set once, not on every step
            factor = step_factor
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * factor

        d_loss = None
        if tuner is not None:  # Delta-STN: its three phases are the step (the general weights' is phase (a))
            loss, terms = tuner.step(step), {}
        else:
            lr_batch, hr = sampler.batch(step)  # (B, C, p, p), (B, C, p*s, p*s) on the device
            if channels_last:
                lr_batch = lr_batch.contiguous(memory_format=torch.channels_last)
            with autocast:
                sr = net(lr_batch).float()  # (B, C, p*s, p*s)

            d_real = d_fake = None
            if gan is not None:
                d_loss, d_real, d_fake = discriminator_step(gan, hr, sr, autocast)

            terms = loss_fn(sr, hr, d_real, d_fake)
            loss = functools.reduce(operator.add, terms.values())  # sum() would add a 0 first: one more op
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opt_config.grad_clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), opt_config.grad_clip_norm)
            optimizer.step()
        if ema_update is not None:
            ema_update(ema_decay_at(opt_config.ema_decay, step))

        extra_terms = {"discriminator": d_loss} if d_loss is not None else {}
        window.add(step, {"total": loss, **terms, **extra_terms}, data.batch_size)
        if step % training.eval_interval != 0 and step != training.steps:
            continue

        previous = history[-1] if history else None
        losses, patches_per_second = window.close(step - (previous.step if previous else first_step - 1), world_size)
        scores, distances, preview = evaluate(
            eval_model, val_pairs, scale, gan.vgg if gan else None, eight_bit=config.data.quantize_lr
        )
        result = EvalResult(
            step=step,
            loss=losses.pop("total"),
            losses=losses,
            lr=optimizer.param_groups[0]["lr"],
            vgg=distances,
            patches_per_second=patches_per_second,
            seconds=(previous.seconds if previous else 0.0) + time.perf_counter() - window.started,
            preview=preview,
            hyper=tuner.values() if tuner is not None else {},
            **scores,
        )
        history.append(result)
        if checkpoint_dir is not None and rank == 0:
            last_path, best = _save_checkpoints(
                Path(checkpoint_dir),
                config,
                result,
                history,
                model=model,
                ema=ema,
                optimizer=optimizer,
                gan=gan,
                tuner=tuner,
                improved=result.psnr > best_psnr,
                mlflow_run_id=mlflow_run_id,
            )
            best_path = best or best_path
        best_psnr = max(best_psnr, result.psnr)
        if on_eval(result, last_path if rank == 0 else None):  # the caller stops the run (e.g. a sweep's scheduler)
            break
        window = LossWindow()

    if checkpoint_dir is not None and best_path is None and (Path(checkpoint_dir) / "best").is_dir():
        best_path = Path(checkpoint_dir) / "best"  # a resumed run whose best came before the resume
    return TrainResult(history=history, last_checkpoint=last_path, best_checkpoint=best_path)
