"""Device-resident image bank and a batched random-patch sampler: no DataLoader, no Python per sample.

The decoded HR images of one rank live as uint8 in a single (pixels, 3) buffer on the worker's device. A
batch is cut out with one gather: for B crops of S x S pixels we build a (B, S, S) index into that buffer
from each crop's image offset, row stride and top-left corner, augment the whole batch at once (S is larger
than the patch when warps need room), then degrade it with the MATLAB-compatible bicubic. Without warps the
flips and rotations are folded into the gather's index, and 8 steps are cut at once (a small batch's time is
per-op cost). The draw for a step depends only on (seed, rank, step), so a resumed run draws exactly the
patches it would have drawn."""

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


def to_model_space(images: torch.Tensor, color: str) -> torch.Tensor:
    """RGB (B, 3, H, W), uint8 or float in [0, 1] -> float (B, 3, H, W) for 'rgb', BT.601 Y (B, 1, H, W) for 'y'."""
    if images.dtype == torch.uint8 and color == "y":
        return uint8_rgb_to_y(images)
    rgb = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return rgb_to_y(rgb) if color == "y" else rgb


class ImageBank:
    """uint8 RGB images packed into one (total_pixels, 3) buffer on ``device``."""

    def __init__(self, images: Sequence[torch.Tensor], device: torch.device | str = "cpu") -> None:
        if not images:
            raise ValueError("an image bank needs at least one image")
        self.device = torch.device(device)
        # Sizes on the CPU for drawing corners (no device sync per step), and on the device for gathering.
        self.cpu_heights = torch.tensor([im.shape[1] for im in images])
        self.cpu_widths = torch.tensor([im.shape[2] for im in images])
        self.heights, self.widths = self.cpu_heights.to(self.device), self.cpu_widths.to(self.device)
        sizes = self.heights * self.widths
        self.offsets = torch.cumsum(sizes, 0) - sizes  # (N,) start of each image in the buffer
        # (total, 3): pixel after pixel, each image row by row.
        self.pixels = torch.cat([im.permute(1, 2, 0).reshape(-1, 3) for im in images]).to(self.device)

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
        """Patches ``size`` x ``size`` at (top, left) of images ``index`` (each (B,)) -> uint8 (B, 3, size, size),
        each turned by ``dihedral`` (B,) in 0..7 as ``augment.dihedral`` turns it, folded into the gather."""
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
        # Whole 3-byte pixels by one row gather: several times faster than indexing a channel-first buffer.
        patches = self.pixels.index_select(0, flat.reshape(-1)).view(*flat.shape, 3)  # (B, P, P, 3)
        return patches.permute(0, 3, 1, 2)  # (B, 3, P, P), a view


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

    def _draw(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image index, top and left of every crop (each (B,), on the CPU)."""
        index = torch.randint(len(self.bank), (self.batch_size,), generator=generator)
        # One draw of 2B numbers is the two draws of B (the generator fills in order): tops, then lefts.
        top, left = (
            torch.rand(2, self.batch_size, generator=generator, dtype=torch.float64) * self.room[:, index]
        ).long()
        return index, top, left

    def draw(self, step: int) -> tuple[torch.Tensor, ...]:
        """Image index, top and left of every crop of ``step`` (each (B,), on the bank's device)."""
        return self._on_device(*self._draw(step_generator(self.seed, self.rank, step)))

    def _on_device(self, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(upload(value, self.bank.device) for value in values)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr, hr) float batches for ``step``: (B, C, p, p) and (B, C, p*s, p*s), C = 1 for Y, 3 for RGB."""
        if self.augmenter.warps:
            generator = step_generator(self.seed, self.rank, step)
            crops = self.bank.crop(*self._on_device(*self._draw(generator)), size=self.crop_size)  # (B, 3, S, S)
            return self._degrade(self.augmenter(crops, self.hr_size, generator))
        # Flips and rotations alone move whole pixels: the gather does them, for a run of steps at once. A small
        # batch's time is the per-op cost of some 20 ops, which a run of steps shares.
        first = step - step % self.steps_at_once  # runs start at multiples: a resumed run cuts the same ones
        if self._run_first != first:
            self._run = self._plain_run(first)
            self._run_first = first
        lr, hr = self._run
        rows = slice((step - first) * self.batch_size, (step - first + 1) * self.batch_size)
        return lr[rows], hr[rows]

    def _plain_run(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr, hr) of steps first .. first + steps_at_once - 1 stacked along the batch axis; each step's crops
        and turns drawn from that step's own generator, as ``draw`` and ``Augmenter`` draw them."""
        index, top, left, turns = [], [], [], []
        for step in range(first, first + self.steps_at_once):
            generator = step_generator(self.seed, self.rank, step)
            for drawn, values in zip((index, top, left), self._draw(generator)):
                drawn.append(values)
            turns.append(self.augmenter.draw_dihedral(generator, index[-1]))
        drawn = self._on_device(*(torch.cat(values) for values in (index, top, left)))
        dihedral = self._on_device(torch.cat(turns))[0] if self.augmenter.flip_rot else None
        return self._degrade(self.bank.crop(*drawn, size=self.hr_size, dihedral=dihedral))

    def _degrade(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RGB patches (N, 3, P, P), uint8 or float in [0, 1] -> (lr, hr) in the model's colour space."""
        hr = to_model_space(rgb, self.color).contiguous()
        lr = degrade(hr, self.scale, blur_sigma=self.blur_sigma)
        return (to_8bit(lr) if self.quantize_lr else lr), hr
