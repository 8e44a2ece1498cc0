"""Delta-STN (Bae & Grosse, NeurIPS 2020): regularisation hyperparameters tuned online, inside one training run.

Every ``nn.Conv2d`` of a network becomes a structured best-response layer (``StnConv2d``): its general weights
w, b plus response weights r, r_b, gated per output channel by a zero-initialised linear map of the centred
hyperparameters (u_i - u0, one row per example):

    [a_i | c_i] = Theta (u_i - u0)            a_i, c_i: (out,)
    w_i = w + diag(a_i) r,   b_i = b + c_i * r_b

At u = u0 the layer is the plain conv with the general weights: training starts as the plain model, and the
model deployed is the plain network (``Responding.plain_state_dict``).

One step (``DeltaStn.step``):
  (a) the general weights on the training loss at u0 (response branch off);
  (b) the response weights on per-example perturbed u_i = u0 + sigma * eps through the linearised response
      f(x; w) + J_u f (u_i - u0) (``torch.func.jvp``), so that they fit the best-response Jacobian;
  (c) every ``hyper_interval`` steps, one step of u (and, with ``tune_scales``, of sigma) on a held-out batch
      with a fixed validation objective (minus an entropy bonus on sigma). The gradient reaches u only through
      the gates: grad_u L_val = grad_w L_val(w) Theta.

Hyperparameters live unconstrained (``Hyperparameters``): ``log`` ones (L2, loss weights) as u = log(value),
projected onto their bounds after each step; ``unit`` ones (augmentation strength) as value = low + (high - low)
* sigmoid(u). A training loss sees the constrained values, one row per example, as constants: only the gates
carry their gradient. L2 is a term of the training loss (per example, ``Responding.squared_weights``), never the
optimizer's ``weight_decay``.

BatchNorm is refused: a per-example perturbation would leak into the other examples through the batch statistics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, kw_only=True)
class HyperSpec:
    """One tuned hyperparameter: its start value and bounds (``log``: positive, tuned in log space)."""

    name: str
    initial: float
    low: float
    high: float
    kind: Literal["log", "unit"] = "log"

    def __post_init__(self) -> None:
        if not self.low < self.initial < self.high:
            raise ValueError(
                f"{self.name}: the start value {self.initial:g} must lie inside ({self.low:g}, {self.high:g})"
            )
        if self.kind == "log" and self.low <= 0:
            raise ValueError(f"{self.name}: a log-scale hyperparameter needs a positive lower bound, not {self.low:g}")

    def unconstrained(self, value: float) -> float:
        if self.kind == "log":
            return math.log(value)
        share = (value - self.low) / (self.high - self.low)
        return math.log(share / (1 - share))


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


class Hyperparameters(nn.Module):
    """The tuned values, unconstrained (``u``: (H,)), and the scale sigma (H,) of their per-example perturbations
    in that space (``raw_scale``: sigma = softplus(raw_scale)), kept at or below ``max_scale``."""

    def __init__(self, specs: tuple[HyperSpec, ...], scale: float = 0.3, max_scale: float = math.inf) -> None:
        super().__init__()
        if not 0 < scale <= max_scale:
            raise ValueError(f"the perturbation scale {scale:g} must lie in (0, {max_scale:g}]")
        self.specs, self.max_scale = specs, max_scale
        self.u = nn.Parameter(torch.tensor([spec.unconstrained(spec.initial) for spec in specs], dtype=torch.float64))
        self.raw_scale = nn.Parameter(torch.full((len(specs),), _inverse_softplus(scale), dtype=torch.float64))
        log_kind = [spec.kind == "log" for spec in specs]
        self.register_buffer("is_log", torch.tensor(log_kind))
        self.register_buffer("low", torch.tensor([spec.low for spec in specs], dtype=torch.float64))
        self.register_buffer("high", torch.tensor([spec.high for spec in specs], dtype=torch.float64))

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def scale(self) -> Tensor:
        return F.softplus(self.raw_scale)

    def constrain(self, u: Tensor) -> Tensor:
        """The values of unconstrained ``u`` (..., H), as the training loss and the augmentation use them."""
        log_value = torch.exp(u).clamp(self.low, self.high)
        unit_value = self.low + (self.high - self.low) * torch.sigmoid(u)
        return torch.where(self.is_log, log_value, unit_value)

    def values(self) -> dict[str, float]:
        return dict(zip(self.names, self.constrain(self.u.detach()).tolist(), strict=True))

    def perturbed(self, batch: int) -> Tensor:
        """(batch, H) draws u_i = u0 + sigma * eps, constants (phase b trains the response weights on them)."""
        u0 = self.u.detach()
        noise = torch.randn((batch, len(self.specs)), dtype=u0.dtype, device=u0.device)
        return u0 + self.scale().detach() * noise

    def entropy(self) -> Tensor:
        """The perturbation's Gaussian entropy, sum of log(sigma sqrt(2 pi e)): rewarding it keeps sigma from
        collapsing to 0 (where the response weights would learn nothing)."""
        return torch.log(self.scale() * math.sqrt(2 * math.pi * math.e)).sum()

    @torch.no_grad()
    def project_(self) -> None:
        """Log-scale values back inside their bounds after a step (the sigmoid keeps unit ones inside), and the
        scales down to ``max_scale``: where the validation loss shows no curvature along a perturbation, nothing
        but the bound holds the entropy bonus back (measured: sigma 0.5 -> 5.4 in 570 steps without it)."""
        bounded = self.u.clamp(torch.log(self.low.clamp_min(1e-300)), torch.log(self.high))
        self.u.copy_(torch.where(self.is_log, bounded, self.u))
        if math.isfinite(self.max_scale):
            self.raw_scale.clamp_(max=_inverse_softplus(self.max_scale))


class _Offset:
    """What every ``StnConv2d`` of one network reads: the centred hyperparameters u_i - u0, (B, H), or None
    (the plain network)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None


class StnConv2d(nn.Module):
    """A ``Conv2d`` (its general weights kept under the same names, ``weight`` and ``bias``) with response
    weights gated per output channel by the offset its network is run at. Costs two convolutions when the
    offset is set, one otherwise."""

    def __init__(self, conv: nn.Conv2d, offset: _Offset, num_hyper: int) -> None:
        super().__init__()
        self.conv, self.offset = conv, offset
        self.response_weight = nn.Parameter(torch.empty_like(conv.weight))
        nn.init.kaiming_uniform_(self.response_weight, a=math.sqrt(5))  # nn.Conv2d's own initialisation
        self.response_bias = nn.Parameter(torch.zeros_like(conv.bias)) if conv.bias is not None else None
        # Zero: at the start every example's weights are the general ones, whatever its offset.
        self.gate = nn.Linear(num_hyper, 2 * conv.out_channels, bias=False, dtype=conv.weight.dtype)
        nn.init.zeros_(self.gate.weight)

    def _gates(self, offset: Tensor) -> tuple[Tensor, Tensor]:
        scale, shift = self.gate(offset.to(self.gate.weight.dtype)).chunk(2, dim=1)
        return scale, shift  # (B, out) each

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        if self.offset.value is None:
            return out
        scale, shift = self._gates(self.offset.value)
        conv = self.conv
        response = F.conv2d(x, self.response_weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        out = out + response * scale[:, :, None, None]
        if self.response_bias is not None:
            out = out + (shift * self.response_bias)[:, :, None, None]
        return out

    def squared_weights(self) -> Tensor:
        """||w_i||^2 of each example's weights (B,), or of the general weights (a 0-d tensor) with no offset:
        per output channel o, ||w_o + a_io r_o||^2 = ||w_o||^2 + 2 a_io <w_o, r_o> + a_io^2 ||r_o||^2."""
        general = self.conv.weight.flatten(1)  # (out, in * k * k)
        if self.offset.value is None:
            return general.square().sum()
        response = self.response_weight.flatten(1)
        scale, _ = self._gates(self.offset.value)
        cross, own = (general * response).sum(1), response.square().sum(1)  # (out,)
        return general.square().sum() + (2 * scale * cross + scale.square() * own).sum(1)


@dataclass(frozen=True)
class Responding:
    """A network whose convolutions respond to the hyperparameters (``respond``)."""

    model: nn.Module
    layers: tuple[StnConv2d, ...]
    _offset: _Offset

    @contextlib.contextmanager
    def at(self, offset: Tensor | None) -> Iterator[None]:
        """Run the network at per-example offsets u_i - u0 (B, H); None: the plain network."""
        before, self._offset.value = self._offset.value, offset
        try:
            yield
        finally:
            self._offset.value = before

    def response_parameters(self) -> list[nn.Parameter]:
        found = []
        for layer in self.layers:
            found += [layer.response_weight, layer.gate.weight]
            found += [layer.response_bias] if layer.response_bias is not None else []
        return found

    def general_parameters(self) -> list[nn.Parameter]:
        """Every other parameter of the network (PReLU slopes and any layer that is not a convolution too)."""
        return plain_parameters(self.model)

    def squared_weights(self) -> Tensor:
        """The L2 penalty's ||w||^2 over every convolution's weights (biases are not decayed): per example (B,)
        at the current offset, a 0-d tensor without one."""
        return sum(layer.squared_weights() for layer in self.layers)

    def plain_state_dict(self) -> dict[str, Tensor]:
        """The general weights under the plain network's own keys: the model to deploy."""
        return {_plain_key(key): value for key, value in self.model.state_dict().items() if not _is_response(key)}

    def response_state_dict(self) -> dict[str, Tensor]:
        """The response weights and gates: with ``plain_state_dict``, the whole network."""
        return {key: value for key, value in self.model.state_dict().items() if _is_response(key)}

    def load_state(self, plain: dict[str, Tensor], response: dict[str, Tensor]) -> None:
        """Inverse of ``plain_state_dict`` and ``response_state_dict`` (strict: every key, nothing more)."""
        general = {_plain_key(key): key for key in self.model.state_dict() if not _is_response(key)}
        self.model.load_state_dict({**{general[key]: value for key, value in plain.items()}, **response})


def _is_response(key: str) -> bool:
    return ".response_" in key or key.startswith("response_") or key.endswith("gate.weight")


def _plain_key(key: str) -> str:
    """A ``StnConv2d``'s general weight or bias under the key the plain ``Conv2d`` had."""
    key = key.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
    return key.removeprefix("conv.")  # a network of one convolution


def plain_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the plain network, in its own order: all of a network that does not respond, the
    general ones of one that does (what an EMA of the plain model averages)."""
    return [param for name, param in model.named_parameters() if not _is_response(name)]


def respond(model: nn.Module, num_hyper: int) -> Responding:
    """Swap every ``Conv2d`` of ``model`` (in place; a bare ``Conv2d`` is wrapped) for a ``StnConv2d`` reading
    one shared offset: train ``Responding.model``. Refuses a network with BatchNorm, naming the layer."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"Delta-STN: layer {name!r} is a BatchNorm; per-example hyperparameters would mix through its batch "
                f"statistics. Use a model without BatchNorm (EDSR-baseline, FSRCNN, ESPCN, VDSR, SRCNN, waifu2x)"
            )
    offset = _Offset()
    if isinstance(model, nn.Conv2d):  # a network of one convolution (a linear filter)
        layer = StnConv2d(model, offset, num_hyper)
        return Responding(layer, (layer,), offset)
    layers = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                layer = StnConv2d(child, offset, num_hyper)
                setattr(parent, child_name, layer)
                layers.append(layer)
    if not layers:
        raise ValueError("Delta-STN: the model has no Conv2d layer to respond to the hyperparameters")
    return Responding(model, tuple(layers), offset)


# A per-example training loss: (prediction, target, hyperparameter values (B, H)) -> (B,), L2 excluded.
TrainLoss = Callable[[Tensor, Tensor, Tensor], Tensor]
# The examples of one step built at per-example hyperparameter values (B, H) (augmentation reads them).
Batch = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class StepOutcome:
    """One Delta-STN step: phase (a)'s training loss (0-d, on the device: reading it syncs) and whether a
    hyperparameter step ran."""

    loss: Tensor
    tuned: bool


@contextlib.contextmanager
def _frozen(parameters: list[nn.Parameter]) -> Iterator[None]:
    """``parameters`` without gradients inside (autograd skips their weight gradients), as before after."""
    before = [param.requires_grad for param in parameters]
    for param in parameters:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, required in zip(parameters, before):
            param.requires_grad_(required)


def _no_averaging(parameters: list[nn.Parameter]) -> None:
    """One process: its gradients are the mean already."""


@dataclass
class DeltaStn:
    """The three phases of a Delta-STN step over one ``Responding`` network.

    ``l2`` names the hyperparameter that weights ||w||^2 in the training loss (None: no L2). ``val_loss`` is
    the fixed validation objective of phase (c): a mean over its batch, never a tunable term."""

    net: Responding
    hyper: Hyperparameters
    general_optimizer: torch.optim.Optimizer
    response_optimizer: torch.optim.Optimizer
    hyper_optimizer: torch.optim.Optimizer
    train_loss: TrainLoss
    val_loss: Callable[[Tensor, Tensor], Tensor]
    l2: str | None = None
    hyper_interval: int = 5  # training steps per hyperparameter step
    warmup_steps: int = 0  # steps before the first hyperparameter step: the response weights learn first
    tune_scales: bool = False
    entropy_weight: float = 1e-3
    grad_clip_norm: float = 0.0  # per weight group, phases (a) and (b); 0: off
    # Averages the gradients of the given parameters over every process (under torch.distributed: all ranks then
    # step the same, and agree on the hyperparameters at every step).
    average_gradients: Callable[[list[nn.Parameter]], None] = _no_averaging
    steps_done: int = 0

    def _l2_index(self) -> int | None:
        return self.hyper.names.index(self.l2) if self.l2 is not None else None

    def _loss(self, pred: Tensor, target: Tensor, values: Tensor) -> Tensor:
        """The training loss at per-example ``values`` (B, H): the user's terms plus lambda_i ||w_i||^2."""
        per_example = self.train_loss(pred, target, values)
        if (index := self._l2_index()) is not None:
            per_example = per_example + values[:, index].to(per_example.dtype) * self.net.squared_weights()
        return per_example.mean()

    def _update(self, optimizer: torch.optim.Optimizer, loss: Tensor, clip: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parameters = [param for group in optimizer.param_groups for param in group["params"]]
        self.average_gradients(parameters)
        if clip and self.grad_clip_norm > 0:
            nn.utils.clip_grad_norm_(parameters, self.grad_clip_norm)
        optimizer.step()

    def step(self, batch_at: Batch, val_batch: Callable[[], tuple[Tensor, Tensor]], batch_size: int) -> StepOutcome:
        """Phases (a) and (b) on batches of ``batch_size`` examples, and (c) every ``hyper_interval`` steps past
        the warm-up. No host sync: read ``hyper.values()`` when the values are wanted."""
        hyper, net = self.hyper, self.net
        u0 = hyper.u.detach()

        # (a) The general weights at u0, the response branch off: the plain model's own training step.
        values0 = hyper.constrain(u0).expand(batch_size, -1)
        x, y = batch_at(values0)
        with net.at(None):
            loss = self._loss(net.model(x), y, values0)
        self._update(self.general_optimizer, loss, clip=True)

        # (b) The response weights at per-example perturbed u_i, through the linearised response.
        u_i = hyper.perturbed(batch_size)
        values_i = hyper.constrain(u_i)
        x, y = batch_at(values_i)
        offset = (u_i - u0).to(x.dtype)  # (B, H)

        # f(x; w) at u0 and its directional derivative along u_i - u0, in one forward-mode pass (dual numbers:
        # the tangent stays differentiable with respect to the response weights).
        # The general weights are constants here: their gradients would cost a third of the backward pass.
        with _frozen(net.general_parameters()):
            with fwAD.dual_level():
                with net.at(fwAD.make_dual(torch.zeros_like(offset), offset)):
                    pred, tangent = fwAD.unpack_dual(net.model(x))
            with net.at(offset):  # the L2 term: each example's own weights, exactly (quadratic in the gates)
                response_loss = self._loss(pred + tangent, y, values_i)
            self._update(self.response_optimizer, response_loss, clip=True)

        self.steps_done += 1
        tuned = self.steps_done > self.warmup_steps and self.steps_done % self.hyper_interval == 0
        if tuned:
            self.hyper_step(val_batch)
        return StepOutcome(loss.detach(), tuned)

    def hyper_step(self, val_batch: Callable[[], tuple[Tensor, Tensor]]) -> None:
        """(c) One step of u (and sigma) on the validation objective: the network at u (+ sigma eps with
        ``tune_scales``) through the gates, centred on the current u0."""
        hyper, net = self.hyper, self.net
        x, y = val_batch()
        if self.tune_scales:
            noise = torch.randn((x.shape[0], len(hyper.specs)), dtype=hyper.u.dtype, device=hyper.u.device)
            at = hyper.u + hyper.scale() * noise
        else:
            at = hyper.u.expand(x.shape[0], -1)
        # Only u (and sigma) learn here: no weight gradients, just the activations' on the way to the gates.
        with _frozen(list(net.model.parameters())):
            with net.at((at - hyper.u.detach()).to(x.dtype)):  # numerically 0 (or sigma eps); d/du = I
                val = self.val_loss(net.model(x), y)
            objective = val - self.entropy_weight * hyper.entropy() if self.tune_scales else val
            self._update(self.hyper_optimizer, objective, clip=False)
        hyper.project_()
