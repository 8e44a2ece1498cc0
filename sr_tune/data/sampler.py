"""Device-resident image bank and a batched random-patch sampler: no DataLoader, no Python per sample.

The decoded HR images of one rank live as uint8 in a single flat buffer on the worker's device. A batch is
cut out with one gather: for B crops of S x S pixels we build a (B, S, S) index into that buffer from
each crop's image offset, row stride and top-left corner, augment the whole batch at once (S is larger
than the patch when warps need room), then degrade it with the MATLAB-compatible bicubic. The draw for a
step depends only on (seed, rank, step), so a resumed run draws exactly the patches it would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sr_tune.data.augment import Augmenter, upload
from sr_tune.data.degrade import degrade, to_8bit
from sr_tune.metrics import rgb_to_y


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, rank, step), well mixed by SeedSequence."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def to_model_space(images: torch.Tensor, color: str) -> torch.Tensor:
    """RGB (B, 3, H, W), uint8 or float in [0, 1] -> float (B, 3, H, W) for 'rgb', BT.601 Y (B, 1, H, W) for 'y'."""
    rgb = images.float() / 255.0 if images.dtype == torch.uint8 else images
    return rgb_to_y(rgb) if color == "y" else rgb


class ImageBank:
    """uint8 RGB images packed into one (3, total_pixels) buffer on ``device``."""

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
        self.pixels = torch.cat([im.reshape(3, -1) for im in images], dim=1).to(self.device)  # (3, total)

    def __len__(self) -> int:
        return len(self.heights)

    def crop(self, index: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
        """Patches ``size`` x ``size`` at (top, left) of images ``index`` (each (B,)) -> uint8 (B, 3, size, size)."""
        span = torch.arange(size, device=self.device)
        rows = top[:, None] + span[None, :]  # (B, P)
        cols = left[:, None] + span[None, :]  # (B, P)
        flat = (
            self.offsets[index, None, None] + rows[:, :, None] * self.widths[index, None, None] + cols[:, None, :]
        )  # (B, P, P) positions in the flat buffer
        patches = self.pixels[:, flat]  # (3, B, P, P)
        return patches.permute(1, 0, 2, 3).contiguous()  # (B, 3, P, P)


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
        too_small = int(((bank.cpu_heights < self.crop_size) | (bank.cpu_widths < self.crop_size)).sum())
        if too_small:
            need = f"the {self.crop_size}px crop that a {self.hr_size}px HR patch needs"
            if self.crop_size > self.hr_size:
                need += f" for warps at augmentation strength {augmenter.strength}"
            raise ValueError(f"{too_small} image(s) are smaller than {need}")

    def _draw(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.randint(len(self.bank), (self.batch_size,), generator=generator)
        room_h = self.bank.cpu_heights[index] - self.crop_size + 1
        room_w = self.bank.cpu_widths[index] - self.crop_size + 1
        top = (torch.rand(self.batch_size, generator=generator, dtype=torch.float64) * room_h).long()
        left = (torch.rand(self.batch_size, generator=generator, dtype=torch.float64) * room_w).long()
        return upload(index, self.bank.device), upload(top, self.bank.device), upload(left, self.bank.device)

    def draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image index, top and left of every crop of ``step`` (each (B,), on the bank's device)."""
        return self._draw(step_generator(self.seed, self.rank, step))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr, hr) float batches for ``step``: (B, C, p, p) and (B, C, p*s, p*s), C = 1 for Y, 3 for RGB."""
        generator = step_generator(self.seed, self.rank, step)
        crops = self.bank.crop(*self._draw(generator), size=self.crop_size)  # uint8 (B, 3, S, S)
        hr = to_model_space(self.augmenter(crops, self.hr_size, generator), self.color)
        lr = degrade(hr, self.scale, blur_sigma=self.blur_sigma)
        return (to_8bit(lr) if self.quantize_lr else lr), hr
