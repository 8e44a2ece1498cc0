"""What an evaluation reports, below the training loop: ``EvalResult`` (one evaluation, as checkpoints,
Tune, MLflow and the summaries read it), the preview images, the metric names runs report, and how far a
trial got (``TrialProgress``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from sr_tune.config import LossConfig
from sr_tune.losses import loss_terms


@dataclass(frozen=True)
class Preview:
    """The first validation image at one evaluation, each RGB (3, H, W) in [0, 1] at HR size (LR repeated).
    Y models' tiles carry the LR's chroma (bicubic-upscaled), so the tiles differ only where the model works."""

    lr: torch.Tensor
    bicubic: torch.Tensor
    sr: torch.Tensor
    hr: torch.Tensor
    bicubic_psnr: float
    sr_psnr: float


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """One evaluation: training losses averaged since the last one, validation on Y with a border crop
    of ``scale`` pixels (model beside bicubic), VGG feature distances for GAN runs, and the hyperparameters a
    Delta-STN run has reached."""

    step: int
    loss: float
    losses: dict[str, float]
    lr: float
    psnr: float
    ssim: float
    bicubic_psnr: float
    bicubic_ssim: float
    vgg: dict[str, float] = field(default_factory=dict)
    hyper: dict[str, float] = field(default_factory=dict)  # Delta-STN runs: the tuned values and their scales
    patches_per_second: float
    seconds: float
    preview: Preview | None = field(default=None, compare=False, repr=False)

    def metrics(self) -> dict[str, float]:
        """Flat metric names as reported to Ray and MLflow: ``EVAL_METRICS``, the loss terms, VGG distances."""
        scalars = (self.loss, self.lr, self.psnr, self.ssim, self.bicubic_psnr, self.bicubic_ssim)
        values = dict(
            zip(EVAL_METRICS, (*scalars, self.psnr - self.bicubic_psnr, self.patches_per_second), strict=True)
        )
        values.update({f"loss_{name}": value for name, value in self.losses.items()})
        values.update({f"val_{name}": value for name, value in self.vgg.items()})
        values.update({f"hp_{name}": value for name, value in self.hyper.items()})
        return values

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "preview"}


# The metrics every evaluation reports (``EvalResult.metrics``) besides its loss terms and VGG distances.
EVAL_METRICS = ("loss", "lr", "val_psnr", "val_ssim", "bicubic_psnr", "bicubic_ssim", "psnr_gain", "patches_per_second")
# The same at every evaluation of a run (bicubic on a fixed validation set): logged once, not as flat curves.
CONSTANT_METRICS = ("bicubic_psnr", "bicubic_ssim")
VGG_DISTANCES = ("vgg22", "vgg54")


def learned_columns(names: Iterable[str]) -> list[str]:
    """The metrics of the values Delta-STN learned inside a run (``hp_<name>``; their scales left out)."""
    return [name for name in names if name.startswith("hp_") and not name.endswith("_scale")]


def metric_names(loss: LossConfig) -> tuple[str, ...]:
    """Every metric name ``EvalResult.metrics`` reports in runs with this loss config: the one list that study
    objectives are checked against and sweep summaries read. GAN runs add the discriminator's loss and the
    VGG feature distances of validation (computed only there)."""
    gan = loss.adversarial != "none"
    terms = (*loss_terms(loss), *(("discriminator",) if gan else ()))
    return (*EVAL_METRICS, *(f"loss_{t}" for t in terms), *(f"val_{d}" for d in VGG_DISTANCES if gan))


@dataclass(frozen=True)
class TrialProgress:
    """How far a trial got by its last report to Tune; one that has not reported got nowhere."""

    step: int = 0
    patches_seen: int = 0

    @classmethod
    def of(cls, metrics: dict[str, Any]) -> TrialProgress:
        if "patches_seen" not in metrics:
            return cls()
        return cls(int(metrics["step"]), int(metrics["patches_seen"]))
