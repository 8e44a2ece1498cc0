"""Per-sample augmentation on the device, scaled by one ``strength`` knob in [0, 1].

Geometric warps (random affine: rotation, zoom, shear, translation; and a perspective homography) are
drawn per sample and applied to a crop larger than the patch, sampling the centred ``patch`` x ``patch``
window. The crop is made large enough for the widest warp the ranges allow, so a warp never samples
outside the image. Then the exact dihedral transforms (flips and rot90, the SR standard) and an optional
colour jitter. Every range is multiplied by ``strength``; at 0 there is no warp and no jitter, the crop is
the patch itself and the pixels are untouched. LR is made afterwards from the augmented HR, so pairs
always agree.

Warp coordinates are in units of half the patch side with the origin at the patch centre: output pixel
centres lie in (-1, 1)^2 and a (B, 3, 3) matrix maps them (homogeneously) to source positions in the
same units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Ranges at strength 1. Each is multiplied by the strength.
MAX_ROTATION_DEGREES = 30.0
MAX_ZOOM = 1.25  # zoom factor drawn log-uniformly in [1 / MAX_ZOOM, MAX_ZOOM]
MAX_SHEAR_DEGREES = 15.0
MAX_TRANSLATE = 0.1  # fraction of the patch side
MAX_CORNER_SHIFT = 0.1  # perspective: each patch corner moves up to this fraction of half the side
MAX_BRIGHTNESS = 0.2  # multiply by 1 +- this
MAX_CONTRAST = 0.2  # blend with each patch's mean grey by 1 +- this
MAX_SATURATION = 0.3  # blend with each pixel's grey by 1 +- this

_CORNERS = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)


def _uniform(generator: torch.Generator, n: int, half_width: float | torch.Tensor) -> torch.Tensor:
    """(n,) float64 uniform in [-half_width, half_width] (``half_width``: one for all, or (n,) one each)."""
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * half_width


def homography_from_corners(target: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) homographies taking the corners (+-1, +-1) to ``target`` (B, 4, 2) (float64)."""
    batch = target.shape[0]
    x, y = _CORNERS[:, 0].expand(batch, 4), _CORNERS[:, 1].expand(batch, 4)
    u, v = target[..., 0], target[..., 1]
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    # Two equations per corner in the 8 unknowns h11..h32 (h33 = 1): (B, 8, 8) @ h = (B, 8).
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -x * u, -y * u], dim=-1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -x * v, -y * v], dim=-1)
    system = torch.cat([rows_u, rows_v], dim=1)
    h = torch.linalg.solve(system, torch.cat([u, v], dim=1))  # (B, 8)
    return torch.cat([h, torch.ones(batch, 1, dtype=h.dtype)], dim=1).reshape(batch, 3, 3)


def warp(images: torch.Tensor, matrices: torch.Tensor, size: int) -> torch.Tensor:
    """Sample ``size`` x ``size`` warped windows centred in ``images`` (B, C, S, S) -> (B, C, size, size).

    ``matrices`` (B, 3, 3) map output positions to source positions, both in units of half of ``size``
    from the centre. Bilinear; outside the crop reads zeros, which the crop size rules out.
    """
    crop = images.shape[-1]
    matrices = upload(matrices.to(images.dtype), images.device)
    centres = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size * 2 - 1  # (size,)
    grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
    points = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1).reshape(-1, 3)  # (size^2, 3)
    source = points @ matrices.transpose(1, 2)  # (B, size^2, 3)
    source = source[..., :2] / source[..., 2:]
    # Half-patch units -> grid_sample's units of half the crop side.
    grid = (source * (size / crop)).reshape(-1, size, size, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def upload(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Random draws made on the CPU -> ``device`` without a host sync: a CUDA copy goes asynchronously from
    pinned memory (PyTorch's caching host allocator keeps the buffer until the copy has run)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def dihedral(images: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 flips/rotations per sample: ``choice`` (B,) in 0..7 on square (B, C, P, P)."""

    def where(bit: int, transformed: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        return torch.where((choice & bit).bool()[:, None, None, None], transformed, current)

    images = where(4, images.transpose(-1, -2), images)
    images = where(2, images.flip(-2), images)
    return where(1, images.flip(-1), images)


_GREY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])  # BT.601 luma


def jitter_colors(
    rgb: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor
) -> torch.Tensor:
    """Brightness, contrast and saturation factors (each (B,)) applied to RGB (B, 3, P, P) in [0, 1]."""
    weights = upload(_GREY_WEIGHTS.to(rgb.dtype), rgb.device)[None, :, None, None]

    def factor(values: torch.Tensor) -> torch.Tensor:
        return upload(values.to(rgb.dtype), rgb.device)[:, None, None, None]

    rgb = (rgb * factor(brightness)).clamp(0, 1)
    mean_grey = (rgb * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # (B, 1, 1, 1)
    rgb = (mean_grey + (rgb - mean_grey) * factor(contrast)).clamp(0, 1)
    grey = (rgb * weights).sum(1, keepdim=True)  # (B, 1, P, P)
    return (grey + (rgb - grey) * factor(saturation)).clamp(0, 1)


@dataclass(frozen=True)
class Augmenter:
    """Draws and applies the augmentation of a batch; all draws come from the caller's generator."""

    strength: float = 0.0
    flip_rot: bool = True
    color_jitter: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"augmentation strength {self.strength} is outside [0, 1]")

    def reach(self) -> float:
        """Largest distance (in half-patch units, per axis) from the centre that any warp samples."""
        s = self.strength
        rotation = math.radians(MAX_ROTATION_DEGREES * s)
        # |A v|_inf <= zoom * ||R||_inf * ||shear||_inf * |v|_inf, and the perspective quad lies within
        # 1 + corner shift of the centre; translation adds its own offset.
        linear = (
            MAX_ZOOM**s
            * (math.cos(rotation) + math.sin(rotation))
            * (1 + math.tan(math.radians(MAX_SHEAR_DEGREES * s)))
        )
        return linear * (1 + MAX_CORNER_SHIFT * s) + 2 * MAX_TRANSLATE * s

    def crop_size(self, patch: int) -> int:
        """Side of the crop that every warp of a ``patch`` x ``patch`` window fits in (same parity as patch)."""
        if self.strength == 0:
            return patch
        # Bilinear reads the pixel centres around each position, hence one pixel more on each side.
        margin = math.ceil(patch * (self.reach() - 1) / 2) + 1
        return patch + 2 * margin

    def _strengths(self, batch: int, strengths: torch.Tensor | None) -> float | torch.Tensor:
        """The strength of each sample: ``strengths`` (B,) float64, each at most the augmenter's own (which sizes
        the crop), or the augmenter's for all. The draws are the same either way; only their ranges scale."""
        if strengths is None:
            return self.strength
        strengths = strengths.detach().to("cpu", torch.float64)
        if strengths.shape != (batch,) or not bool(((strengths >= 0) & (strengths <= self.strength)).all()):
            raise ValueError(f"per-sample strengths must be {batch} values in [0, {self.strength}]")
        return strengths

    def warp_matrices(
        self, batch: int, generator: torch.Generator, strengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 3, 3) float64: perspective then zoom * rotation * shear, then translation; at ``strengths`` (B,)
        per sample when given."""
        s = self._strengths(batch, strengths)

        def each(draws: int) -> float | torch.Tensor:  # the strength of each of ``draws`` draws per sample
            return s.repeat_interleave(draws) if isinstance(s, torch.Tensor) else s

        corners = _CORNERS + _uniform(generator, batch * 8, MAX_CORNER_SHIFT * each(8)).reshape(batch, 4, 2)
        perspective = homography_from_corners(corners)
        angle = torch.deg2rad(_uniform(generator, batch, MAX_ROTATION_DEGREES * s))
        zoom = torch.exp(_uniform(generator, batch, math.log(MAX_ZOOM) * s))
        shear = torch.tan(torch.deg2rad(_uniform(generator, batch, MAX_SHEAR_DEGREES * s)))
        shift = _uniform(generator, batch * 2, 2 * MAX_TRANSLATE * each(2)).reshape(batch, 2)
        cos, sin = torch.cos(angle), torch.sin(angle)
        affine = torch.zeros(batch, 3, 3, dtype=torch.float64)
        # zoom * [[cos, -sin], [sin, cos]] @ [[1, shear], [0, 1]]
        affine[:, 0, 0], affine[:, 0, 1] = zoom * cos, zoom * (cos * shear - sin)
        affine[:, 1, 0], affine[:, 1, 1] = zoom * sin, zoom * (sin * shear + cos)
        affine[:, :2, 2], affine[:, 2, 2] = shift, 1.0
        return affine @ perspective

    @property
    def warps(self) -> bool:
        """Whether pixels move by anything but whole-pixel flips and rotations (or change colour)."""
        return self.strength > 0

    def __call__(
        self, crops: torch.Tensor, patch: int, generator: torch.Generator, strengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 crops (B, 3, crop_size, crop_size) -> augmented float RGB patches (B, 3, patch, patch) in [0, 1];
        at ``strengths`` (B,) per sample when given (each at most the augmenter's strength)."""
        batch = crops.shape[0]
        rgb = crops.float() / 255.0
        if self.warps:
            rgb = warp(rgb, self.warp_matrices(batch, generator, strengths), patch).clamp(0, 1)
        if self.flip_rot:
            rgb = dihedral(rgb, upload(torch.randint(8, (batch,), generator=generator), rgb.device))
        if self.color_jitter and self.warps:
            s = self._strengths(batch, strengths)
            factors = [1 + _uniform(generator, batch, r * s) for r in (MAX_BRIGHTNESS, MAX_CONTRAST, MAX_SATURATION)]
            rgb = jitter_colors(rgb, *factors)
        return rgb
