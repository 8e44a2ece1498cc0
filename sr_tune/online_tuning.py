"""Delta-STN inside the training loop (``delta_stn:`` in a training config): the engine's step for such runs.

``OnlineTuner.build`` turns a model (in place) into its responding form and builds, from the config, the tuned
hyperparameters, the response and hyperparameter optimizers beside the engine's own (which trains the general
weights), the per-patch training loss and the validation patches of the hyperparameter step. One
``OnlineTuner.step`` is Delta-STN's three phases on the step's patches. Its state (response weights, the
hyperparameters, their scales, both extra optimizers) rides in the run's ``last`` checkpoint beside the plain
weights, so a resumed run continues the same trajectory, and every checkpoint loads as the plain model.

Under ``torch.distributed`` the model is not DDP-wrapped: each phase averages its gradients over the ranks,
so every rank takes the same step and all agree on the hyperparameters at every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sr_tune.checkpoint import Checkpoint
from sr_tune.config import TrainConfig
from sr_tune.data.augment import Augmenter
from sr_tune.data.sampler import ImageBank, PatchSampler
from sr_tune.data.sources import large_enough, open_source
from sr_tune.delta_stn import DeltaStn, Hyperparameters, HyperSpec, Responding, respond
from sr_tune.losses import per_example_pixel_loss
from sr_tune.optim import build_optimizer, restore_keeping_settings


def hyper_specs(config: TrainConfig) -> tuple[HyperSpec, ...]:
    """The tuned hyperparameters in ``DeltaStnConfig.tuned``'s order."""
    stn = config.delta_stn
    specs = []
    if stn.l2:
        specs.append(HyperSpec(name="l2", initial=stn.l2[0], low=stn.l2[1], high=stn.l2[2]))
    if stn.augment_strength:
        initial, low, high = stn.augment_strength
        specs.append(HyperSpec(name="augment_strength", initial=initial, low=low, high=high, kind="unit"))
    for loss, (initial, low, high) in stn.pixel_mix.items():
        specs.append(HyperSpec(name=f"mix_{loss}", initial=initial, low=low, high=high))
    return tuple(specs)


def average_over_ranks(parameters: list[nn.Parameter]) -> None:
    """Each gradient replaced by its mean over every rank: one all-reduce per dtype."""
    world_size = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch.cat([grad.flatten() for grad in grads])
        dist.all_reduce(flat)
        flat /= world_size
        for grad, mean in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(mean.view_as(grad))


def validation_patches(config: TrainConfig, device: torch.device, rank: int, batch_size: int) -> PatchSampler:
    """Patches of the validation images, as the training ones are made but never augmented: the batches of
    the hyperparameter step (each rank its own draws)."""
    data, scale = config.data, config.model.scale
    hr_size = data.lr_patch_size * scale
    images = open_source(data.val, "val", skip_bad=data.skip_bad)
    why = f"the {hr_size}px HR patches of Delta-STN's hyperparameter step"
    images = large_enough(images, hr_size, why=why, skip_bad=data.skip_bad, source=data.val)
    return PatchSampler(
        ImageBank([image.hr for image in images], device, luma=data.color == "y"),
        scale=scale,
        lr_patch_size=data.lr_patch_size,
        batch_size=batch_size,
        color=data.color,
        blur_sigma=data.blur_sigma,
        quantize_lr=data.quantize_lr,
        augmenter=Augmenter(flip_rot=False),
        seed=config.training.seed + 1,  # not the training stream
        rank=rank,
    )


def _objective(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The hyperparameter step's fixed objective: a mean over the batch that no tuned value enters."""
    if name == "psnr":  # minus the mean PSNR (in dB) of the patches, values in [0, 1]
        return lambda sr, hr: 10 * torch.log10((sr - hr).square().flatten(1).mean(1).clamp_min(1e-10)).mean()
    return lambda sr, hr: (sr - hr).abs().mean()


@dataclass
class OnlineTuner:
    """A Delta-STN run's step and state, beside the engine's loop."""

    stn: DeltaStn
    sampler: PatchSampler
    val_sampler: PatchSampler
    strength_index: int | None  # the column of augment_strength among the hyperparameters

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        model: nn.Module,
        general_optimizer: torch.optim.Optimizer,
        sampler: PatchSampler,
        *,
        rank: int,
        world_size: int,
    ) -> OnlineTuner:
        """``model`` (already on its device, its general weights in ``general_optimizer``) responds in place."""
        stn, opt = config.delta_stn, config.optimizer
        specs = hyper_specs(config)
        device = next(model.parameters()).device
        net = respond(model, num_hyper=len(specs))
        hyper = Hyperparameters(specs, scale=stn.perturbation, max_scale=stn.max_perturbation).to(device)
        lr = general_optimizer.param_groups[0]["initial_lr"]
        # The response weights learn as the general ones do: same optimizer, lr and schedule, no weight decay.
        response_optimizer = build_optimizer(
            dataclasses.replace(opt, weight_decay=0.0),
            [{"params": net.response_parameters(), "lr": lr, "initial_lr": lr}],
        )
        hyper_parameters = [hyper.u, hyper.raw_scale] if stn.tune_scales else [hyper.u]
        pixel = per_example_pixel_loss(config.loss.pixel, config.loss.charbonnier_eps)
        eps = config.loss.charbonnier_eps
        fixed = [(weight, per_example_pixel_loss(name, eps)) for name, weight in config.loss.mix.items() if weight > 0]
        tuned = [
            (index, per_example_pixel_loss(spec.name.removeprefix("mix_"), eps))
            for index, spec in enumerate(specs)
            if spec.name.startswith("mix_")
        ]
        pixel_weight = config.loss.pixel_weight

        def train_loss(sr: Tensor, hr: Tensor, values: Tensor) -> Tensor:  # (B,): the fixed terms plus the tuned
            loss = pixel_weight * pixel(sr, hr)
            for weight, term in fixed:
                loss = loss + weight * term(sr, hr)
            for index, term in tuned:
                loss = loss + values[:, index].to(loss.dtype) * term(sr, hr)
            return loss

        names = [spec.name for spec in specs]
        delta_stn = DeltaStn(
            net=net,
            hyper=hyper,
            general_optimizer=general_optimizer,
            response_optimizer=response_optimizer,
            # Adam, not the paper code's RMSprop: its momentum averages a hypergradient that is mostly noise
            # from one validation batch to the next (FSRCNN x2, a harmful L2 start: 1e-3 -> 1.7e-4 in 1,000
            # steps, against 5.7e-4 with RMSprop at 1e-2).
            hyper_optimizer=torch.optim.Adam(hyper_parameters, lr=stn.hyper_lr),
            train_loss=train_loss,
            val_loss=_objective(stn.objective),
            l2="l2" if "l2" in names else None,
            hyper_interval=stn.interval,
            warmup_steps=stn.warmup_steps,
            tune_scales=stn.tune_scales,
            entropy_weight=stn.entropy_weight,
            grad_clip_norm=opt.grad_clip_norm,
            **({"average_gradients": average_over_ranks} if world_size > 1 and dist.is_initialized() else {}),
        )
        val_batch = stn.val_batch_size or config.data.batch_size
        strength_index = names.index("augment_strength") if "augment_strength" in names else None
        return cls(delta_stn, sampler, validation_patches(config, device, rank, val_batch), strength_index)

    @property
    def net(self) -> Responding:
        return self.stn.net

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The two optimizers beside the engine's: saved and restored by these names."""
        return {"response_optimizer": self.stn.response_optimizer, "hyper_optimizer": self.stn.hyper_optimizer}

    def step(self, step: int) -> Tensor:
        """One Delta-STN step on training step ``step``'s patches (phase (c) on validation patches drawn for it,
        when due); returns phase (a)'s training loss, on the device."""
        index = self.strength_index

        def batch_at(values: Tensor) -> tuple[Tensor, Tensor]:  # the step's crops, each at its own strength
            return self.sampler.batch(step, strengths=None if index is None else values[:, index])

        return self.stn.step(batch_at, lambda: self.val_sampler.batch(step), self.sampler.batch_size).loss

    def values(self) -> dict[str, float]:
        """Each hyperparameter's value and its perturbation scale (``<name>_scale``): one host sync."""
        hyper = self.stn.hyper
        scales = {f"{name}_scale": value for name, value in zip(hyper.names, hyper.scale().tolist())}
        return {**hyper.values(), **scales}

    def modules(self) -> dict[str, dict[str, Tensor]]:
        """What a checkpoint keeps beside the plain weights, by group."""
        return {"response": self.net.response_state_dict(), "hyper": self.stn.hyper.state_dict()}

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue ``checkpoint``'s trajectory: response weights, hyperparameters, scales, optimizers, step."""
        self.net.load_state(checkpoint.group("model"), checkpoint.group("response"))
        self.stn.hyper.load_state_dict(checkpoint.group("hyper"))
        for name, optimizer in self.optimizers.items():
            restore_keeping_settings(optimizer, checkpoint.group(name), checkpoint.optimizers[name])
        self.stn.steps_done = checkpoint.step
