"""Loss terms: pixel (MSE / L1 / Charbonnier), VGG19 perceptual (SRGAN's VGG22 / VGG54), adversarial.

``SRLoss`` returns every weighted term by name, so the engine can report them separately and name the
term that went non-finite. Weights are config values, so sweeps can tune them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sr_tune.config import LossConfig

# Index one past the ReLU in torchvision's vgg19().features: relu2_2 is features[8], relu5_4 features[35].
VGG_LAYERS = {"vgg22": 9, "vgg54": 36}


def vgg_weights() -> Any:
    """torchvision's VGG19 ImageNet weights entry. Imported here: torchvision takes seconds to import, and
    only runs with a perceptual loss need it (every Ray actor that unpickles a run would pay for it)."""
    from torchvision.models import VGG19_Weights

    return VGG19_Weights.IMAGENET1K_V1


def pixel_loss(name: str, charbonnier_eps: float = 1e-3) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "mse":
        return F.mse_loss
    if name == "l1":
        return F.l1_loss
    if name == "charbonnier":
        eps2 = charbonnier_eps**2
        return lambda sr, hr: torch.sqrt((sr - hr).pow(2) + eps2).mean()
    raise ValueError(f"unknown pixel loss {name!r} (allowed: mse, l1, charbonnier)")


def per_example_pixel_loss(
    name: str, charbonnier_eps: float = 1e-3
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``pixel_loss`` of each example: (B, C, H, W) pairs -> (B,), whose mean is ``pixel_loss``."""
    eps2 = charbonnier_eps**2
    distances = {
        "mse": lambda d: d.square(),
        "l1": lambda d: d.abs(),
        "charbonnier": lambda d: torch.sqrt(d.square() + eps2),
    }
    if name not in distances:
        raise ValueError(f"unknown pixel loss {name!r} (allowed: {', '.join(distances)})")
    distance = distances[name]
    return lambda sr, hr: distance(sr - hr).flatten(1).mean(1)


def vgg_weights_file() -> Path:
    """Where torchvision keeps the VGG19 ImageNet weights: $TORCH_HOME/hub/checkpoints/vgg19-dcbb9e9d.pth."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(vgg_weights().url).name


def load_vgg19_features(layer: str) -> nn.Sequential:
    """Frozen VGG19 ``features`` up to ``layer`` ('vgg22' or 'vgg54'), ImageNet weights, in eval mode.

    Weights load through torchvision's weights API (downloaded into the torch hub cache once). Offline
    without the cached file, the error names the file and where to put it.
    """
    if layer not in VGG_LAYERS:
        raise ValueError(f"unknown VGG layer {layer!r} (allowed: {', '.join(VGG_LAYERS)})")
    try:
        state = vgg_weights().get_state_dict(progress=False, weights_only=True)
    except OSError as error:  # URLError and socket errors are OSErrors
        raise FileNotFoundError(
            f"cannot load the VGG19 ImageNet weights for the perceptual loss ({error}). Without internet, "
            f"download {vgg_weights().url} elsewhere and place it at {vgg_weights_file()} "
            f"(set TORCH_HOME to use another cache folder)"
        ) from None
    from torchvision.models import vgg19

    network = vgg19(weights=None)
    # Only the convolutional part is used, so a features-only state dict is enough.
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    network.features.load_state_dict(features)
    trunk = network.features[: VGG_LAYERS[layer]].eval()
    trunk.requires_grad_(False)
    return trunk


class PerceptualLoss(nn.Module):
    """MSE between VGG19 features of SR and HR. Inputs in [0, 1]; Y inputs are repeated to 3 channels."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.features = load_vgg19_features(layer)
        transforms = vgg_weights().transforms()
        self.register_buffer("mean", torch.tensor(transforms.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(transforms.std).view(1, 3, 1, 1))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [0, 1] -> ImageNet-normalised RGB (B, 3, H, W)."""
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return (rgb - self.mean) / self.std

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        # Features: (B, 128, H/2, W/2) at relu2_2, (B, 512, H/16, W/16) at relu5_4.
        return F.mse_loss(self.features(self.normalise(sr)), self.features(self.normalise(hr)).detach())

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # VGG stays in eval mode whatever its owner does


class VGGDistance(nn.Module):
    """Mean squared VGG19 feature distances at relu2_2 and relu5_4 ('vgg22', 'vgg54'): SRGAN's perceptual
    measures, reported at evaluation for GAN runs."""

    def __init__(self) -> None:
        super().__init__()
        self.perceptual = PerceptualLoss("vgg54")

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        trunk = self.perceptual.features
        x, y = self.perceptual.normalise(sr), self.perceptual.normalise(hr)
        x22, y22 = trunk[: VGG_LAYERS["vgg22"]](x), trunk[: VGG_LAYERS["vgg22"]](y)
        x54, y54 = trunk[VGG_LAYERS["vgg22"] :](x22), trunk[VGG_LAYERS["vgg22"] :](y22)
        return {"vgg22": F.mse_loss(x22, y22), "vgg54": F.mse_loss(x54, y54)}


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D's loss from logits (B,) on HR (``real``) and SR (``fake``): plain or relativistic-average BCE."""
    if kind == "relativistic":
        real, fake = real - fake.mean(), fake - real.mean()
    return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + F.binary_cross_entropy_with_logits(
        fake, torch.zeros_like(fake)
    )


def generator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """G's adversarial loss: make D call SR real (relativistic: and HR, relatively, fake)."""
    if kind == "relativistic":
        return discriminator_loss(kind, fake, real)
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


def loss_terms(config: LossConfig) -> tuple[str, ...]:
    """The generator's loss terms that ``config`` switches on (a weight of 0 switches a term off)."""
    switched_on = {
        "pixel": config.pixel_weight > 0,
        **{f"mix_{name}": weight > 0 for name, weight in config.mix.items()},
        "perceptual": config.perceptual != "none" and config.perceptual_weight > 0,
        "adversarial": config.adversarial != "none" and config.adversarial_weight > 0,
    }
    return tuple(name for name, on in switched_on.items() if on)


def _weighted(weight: float, term: torch.Tensor) -> torch.Tensor:
    return term if weight == 1 else weight * term  # a weight of 1: no op, no autograd node, on every step


class SRLoss(nn.Module):
    """Weighted loss terms for the generator: {'pixel', 'mix_<pixel loss>', 'perceptual', 'adversarial'} (those
    switched on)."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config
        self.terms = loss_terms(config)
        self.pixel = pixel_loss(config.pixel, config.charbonnier_eps)
        self.mix = {
            name: pixel_loss(name, config.charbonnier_eps) for name in config.mix if f"mix_{name}" in self.terms
        }
        self.perceptual = PerceptualLoss(config.perceptual) if "perceptual" in self.terms else None

    def forward(
        self, sr: torch.Tensor, hr: torch.Tensor, d_real: torch.Tensor | None = None, d_fake: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Weighted terms; ``d_real``/``d_fake`` are the discriminator's logits (B,) for adversarial runs."""
        c = self.config
        terms = {}
        if "pixel" in self.terms:
            terms["pixel"] = _weighted(c.pixel_weight, self.pixel(sr, hr))
        for name, term in self.mix.items():
            terms[f"mix_{name}"] = _weighted(c.mix[name], term(sr, hr))
        if self.perceptual is not None:
            terms["perceptual"] = _weighted(c.perceptual_weight, self.perceptual(sr, hr))
        if "adversarial" in self.terms:
            if d_real is None or d_fake is None:
                raise ValueError("adversarial loss needs the discriminator's logits on HR and SR")
            terms["adversarial"] = _weighted(c.adversarial_weight, generator_loss(c.adversarial, d_real, d_fake))
        return terms
