"""Device-resident image bank and a batched random-patch sampler: no DataLoader, no Python per sample.

The decoded HR images of one rank live in a single (pixels, C) buffer on the worker's device: uint8 RGB, or
for a model trained on Y without warps, each pixel's float Y, converted once instead of in every batch. A
batch is cut out with one gather: for B crops of S x S pixels we build a (B, S, S) index into that buffer
from each crop's image offset, row stride and top-left corner, augment the whole batch at once (S is larger
than the patch when warps need room), then degrade it with the MATLAB-compatible bicubic. Without warps the
flips and rotations are folded into the gather's index, and 8 steps are cut at once (a small batch's time is
per-op cost). Crops and turns are hashes of (seed, rank, step, draw), so a run of steps draws them in a few
vectorized ops, and a resumed run draws exactly the patches it would have drawn."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sr_tune.data.augment import Augmenter, upload
from sr_tune.data.degrade import degrade, to_8bit
from sr_tune.metrics import rgb_to_y, uint8_rgb_to_y


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, rank, step), well mixed by SeedSequence."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's output function over uint64 values (numpy wraps array arithmetic modulo 2^64)."""
    values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def step_uniforms(key: int, first: int, steps: int, count: int) -> torch.Tensor:
    """(steps, count) float64 uniforms in [0, 1) for steps first .. first + steps - 1: draw k of step s is
    SplitMix64 of the counter s * count + k in the stream ``key``, so it depends on nothing else."""
    counters = np.arange(first * count, (first + steps) * count, dtype=np.uint64)
    bits = _splitmix64(counters * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key))  # SplitMix64's increment
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53).view(steps, count)


def to_model_space(images: torch.Tensor, color: str) -> torch.Tensor:
    """RGB (B, 3, H, W), uint8 or float in [0, 1] -> float (B, 3, H, W) for 'rgb', BT.601 Y (B, 1, H, W) for 'y'."""
    if images.dtype == torch.uint8 and color == "y":
        return uint8_rgb_to_y(images)
    rgb = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return rgb_to_y(rgb) if color == "y" else rgb


class ImageBank:
    """uint8 RGB images packed into one (total_pixels, 3) buffer on ``device``; with ``luma``, their BT.601 Y
    as float in a (total_pixels,) buffer instead (a third more memory, no conversion per batch)."""

    def __init__(
        self, images: Sequence[torch.Tensor], device: torch.device | str = "cpu", *, luma: bool = False
    ) -> None:
        if not images:
            raise ValueError("an image bank needs at least one image")
        self.device = torch.device(device)
        # Sizes on the CPU for drawing corners (no device sync per step), and on the device for gathering.
        self.cpu_heights = torch.tensor([im.shape[1] for im in images])
        self.cpu_widths = torch.tensor([im.shape[2] for im in images])
        self.heights, self.widths = self.cpu_heights.to(self.device), self.cpu_widths.to(self.device)
        sizes = self.heights * self.widths
        self.offsets = torch.cumsum(sizes, 0) - sizes  # (N,) start of each image in the buffer
        # (total, 3) RGB or (total,) Y: pixel after pixel, each image row by row. Y is converted image by image,
        # as validation converts its images, so the same pixel has the same Y in both.
        self.luma = luma
        pixels = [uint8_rgb_to_y(im).view(-1) if luma else im.permute(1, 2, 0).reshape(-1, 3) for im in images]
        self.pixels = torch.cat(pixels).to(self.device)

    def __len__(self) -> int:
        return len(self.heights)

    def crop(
        self,
        index: torch.Tensor,
        top: torch.Tensor,
        left: torch.Tensor,
        size: int,
        dihedral: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patches ``size`` x ``size`` at (top, left) of images ``index`` (each (B,)) -> (B, C, size, size) of the
        buffer's dtype, each turned by ``dihedral`` (B,) in 0..7 as ``augment.dihedral`` turns it, in the gather."""
        span = torch.arange(size, device=self.device)[None, :]  # (1, P)
        widths = self.widths[index]  # (B,)
        corner = self.offsets[index] + top * widths + left  # (B,) the crop's top-left pixel in the buffer
        if dihedral is None:
            down, across, row_stride, col_stride = span, span, widths, torch.ones_like(widths)
        else:
            # dihedral: transpose if bit 4, then flip rows if bit 2, then columns if bit 1. Output (i, j) then
            # reads the crop at row down[i], column across[j]; transposed, at row across[j], column down[i].
            flipped = size - 1 - span
            down = torch.where((dihedral & 2).bool()[:, None], flipped, span)  # (B, P)
            across = torch.where((dihedral & 1).bool()[:, None], flipped, span)  # (B, P)
            transposed = (dihedral & 4).bool()
            row_stride, col_stride = torch.where(transposed, 1, widths), torch.where(transposed, widths, 1)
        rows = corner[:, None] + down * row_stride[:, None]  # (B, P)
        cols = across * col_stride[:, None]  # (B, P)
        flat = rows[:, :, None] + cols[:, None, :]  # (B, P, P) pixels of the buffer
        # Whole pixels by one row gather: several times faster than indexing a channel-first buffer.
        patches = self.pixels.index_select(0, flat.reshape(-1)).view(*flat.shape, -1)  # (B, P, P, C)
        return patches.permute(0, 3, 1, 2)  # (B, C, P, P), a view


class PatchSampler:
    """Random, augmented HR patches of ``lr_patch_size * scale`` from a bank, degraded to LR on its device."""

    def __init__(
        self,
        bank: ImageBank,
        *,
        scale: int,
        lr_patch_size: int,
        batch_size: int,
        color: str,
        blur_sigma: float = 0.0,
        quantize_lr: bool = False,
        augmenter: Augmenter = Augmenter(flip_rot=False),
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.bank, self.scale, self.batch_size, self.augmenter = bank, scale, batch_size, augmenter
        self.hr_size = lr_patch_size * scale
        self.crop_size = augmenter.crop_size(self.hr_size)
        self.color, self.blur_sigma, self.seed, self.rank = color, blur_sigma, seed, rank
        self.quantize_lr = quantize_lr
        if bank.luma and (color != "y" or augmenter.warps):
            raise ValueError("a bank of Y pixels serves Y training without warps; give it RGB (luma=False)")
        self.key = int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0])  # draws' stream
        # Steps drawn together when nothing warps: up to 8, while their HR batch stays within 2^21 values (8 MB).
        channels = 1 if color == "y" else 3
        self.steps_at_once = max(1, min(8, 2**21 // (batch_size * channels * self.hr_size**2)))
        self._run_first, self._run = -1, (torch.empty(0), torch.empty(0))
        # (2, N): how many tops and lefts each image has for a crop
        self.room = torch.stack([bank.cpu_heights, bank.cpu_widths]) - self.crop_size + 1
        too_small = int((self.room < 1).any(0).sum())
        if too_small:
            need = f"the {self.crop_size}px crop that a {self.hr_size}px HR patch needs"
            if self.crop_size > self.hr_size:
                need += f" for warps at augmentation strength {augmenter.strength}"
            raise ValueError(f"{too_small} image(s) are smaller than {need}")

    def _draw(self, first: int, steps: int = 1) -> tuple[torch.Tensor, ...]:
        """Image index, top, left and turn (0..7, ``augment.dihedral``'s numbering) of every crop of steps first ..
        first + steps - 1, each (steps * B,) on the bank's device. Each step uses 4B draws of its own."""
        draws = step_uniforms(self.key, first, steps, 4 * self.batch_size).view(steps, 4, self.batch_size)
        draws = draws.transpose(0, 1).reshape(4, steps * self.batch_size)  # (4, steps * B): one row per kind
        index = (draws[0] * len(self.bank)).long()
        top, left = (draws[1:3] * self.room[:, index]).long()
        turn = (draws[3] * 8).long()
        return tuple(upload(torch.stack([index, top, left, turn]), self.bank.device))  # one copy to a GPU

    def draw(self, step: int) -> tuple[torch.Tensor, ...]:
        """Image index, top and left of every crop of ``step`` (each (B,), on the bank's device)."""
        return self._draw(step)[:3]

    def batch(self, step: int, strengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr, hr) float batches for ``step``: (B, C, p, p) and (B, C, p*s, p*s), C = 1 for Y, 3 for RGB; the same
        crops and draws at any per-sample augmentation ``strengths`` (B,) up to the augmenter's own."""
        if self.augmenter.warps:
            crops = self.bank.crop(*self.draw(step), size=self.crop_size)  # (B, 3, S, S)
            generator = step_generator(self.seed, self.rank, step)
            return self._degrade(self.augmenter(crops, self.hr_size, generator, strengths))
        if strengths is not None:
            raise ValueError("per-sample augmentation strengths need an augmenter with a strength above 0")
        # Flips and rotations alone move whole pixels: the gather does them, for a run of steps at once. A small
        # batch's time is the per-op cost of some 20 ops, which a run of steps shares.
        first = step - step % self.steps_at_once  # runs start at multiples: a resumed run cuts the same ones
        if self._run_first != first:
            index, top, left, turn = self._draw(first, self.steps_at_once)
            dihedral = turn if self.augmenter.flip_rot else None
            self._run = self._degrade(self.bank.crop(index, top, left, size=self.hr_size, dihedral=dihedral))
            self._run_first = first
        lr, hr = self._run
        rows = slice((step - first) * self.batch_size, (step - first + 1) * self.batch_size)
        return lr[rows], hr[rows]

    def _degrade(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches (N, C, P, P): uint8 RGB, float RGB in [0, 1] or the bank's Y -> (lr, hr) in the model's
        colour space."""
        hr = (patches if self.bank.luma else to_model_space(patches, self.color)).contiguous()
        lr = degrade(hr, self.scale, blur_sigma=self.blur_sigma)
        return (to_8bit(lr) if self.quantize_lr else lr), hr
