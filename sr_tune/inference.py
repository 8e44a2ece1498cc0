"""Inference on images of any size: overlapping tiles whose seams vanish, memory bounded by the tile size.

Each LR tile is cut with a margin of the model's receptive radius on every side (clipped at the image
border), run through the model, and only its centre is kept. Every kept output pixel therefore saw
exactly the context it would see in a whole-image pass, so the result equals whole-image inference up to
float rounding, while the model never sees more than (tile + 2 * margin)^2 LR pixels at once.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from sr_tune.data.degrade import imresize
from sr_tune.metrics import rgb_to_ycbcr, ycbcr_to_rgb

if TYPE_CHECKING:
    from sr_tune.checkpoint import Checkpoint


def receptive_radius(model: nn.Module, channels: int, *, limit: int = 1025) -> int:
    """LR pixels on each side of a position that can influence the output there, found by back-propagating
    from one output pixel of a random probe (exact for convolutional networks, any architecture)."""
    size = 33
    device = next(model.parameters()).device
    while True:
        probe = torch.rand(1, channels, size, size, device=device, requires_grad=True)
        output = model(probe)  # (1, C, size*s, size*s)
        output[..., output.shape[-2] // 2, output.shape[-1] // 2].sum().backward()
        reached = (probe.grad.abs().sum((0, 1)) > 0).nonzero()  # (N, 2) rows and columns that matter
        radius = int((reached - size // 2).abs().max())
        if radius < size // 2 - 1 or size >= limit:
            return radius + 1  # one pixel more for the sub-pixel offset of the output centre
        size = 2 * size + 1


# LR pixels of context bicubic upscaling reads on each side (its kernel reaches 2 LR pixels; one more for the
# half-pixel offset of the output grid): chroma tiles cut with it equal the whole image's, as model tiles do.
BICUBIC_MARGIN = 3


@dataclass(frozen=True)
class Tile:
    """One tile of an LR image of ``height x width``: what it covers and what is cut to compute it."""

    top: int
    left: int
    bottom: int
    right: int
    margin: int
    height: int
    width: int

    @property
    def cut(self) -> tuple[slice, slice]:
        """LR rows and columns fed to the model: the tile and its margins, clipped at the image border."""
        return slice(max(self.top - self.margin, 0), min(self.bottom + self.margin, self.height)), slice(
            max(self.left - self.margin, 0), min(self.right + self.margin, self.width)
        )

    def kept(self, scale: int) -> tuple[slice, slice]:
        """The rows and columns of the cut's output that belong to the tile."""
        rows, cols = self.cut
        return slice((self.top - rows.start) * scale, (self.bottom - rows.start) * scale), slice(
            (self.left - cols.start) * scale, (self.right - cols.start) * scale
        )

    def placed(self, scale: int) -> tuple[slice, slice]:
        """Where the tile goes in the output."""
        return slice(self.top * scale, self.bottom * scale), slice(self.left * scale, self.right * scale)


def tiles(height: int, width: int, tile: int, margin: int) -> Iterator[Tile]:
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            yield Tile(top, left, min(top + tile, height), min(left + tile, width), margin, height, width)


@torch.no_grad()
def upscale_tiled(model: nn.Module, lr: torch.Tensor, scale: int, *, tile: int = 256, margin: int) -> torch.Tensor:
    """(1, C, H, W) LR -> (1, C, H*s, W*s) on the CPU, in tiles of ``tile`` LR pixels with ``margin`` of context."""
    device = next(model.parameters()).device
    _, channels, height, width = lr.shape
    output = torch.empty(1, channels, height * scale, width * scale)
    for part in tiles(height, width, tile, margin):
        rows, cols = part.cut
        sr = model(lr[:, :, rows, cols].to(device)).float().cpu()
        output[(..., *part.placed(scale))] = sr[(..., *part.kept(scale))]
    return output


class Upscaler:
    """A trained model ready for images of any size: Y models upscale luma with the network and chroma
    with bicubic (the SRCNN convention); RGB models upscale all three channels."""

    def __init__(self, model: nn.Module, *, scale: int, color: str, tile: int = 256) -> None:
        self.model, self.scale, self.color, self.tile = model.eval(), scale, color, tile
        with torch.enable_grad():
            self.margin = receptive_radius(model, 1 if color == "y" else 3)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, tile: int = 256) -> Upscaler:
        """The checkpoint's model (its EMA weights when it has them) at its own scale and colour space."""
        config = checkpoint.config
        return cls(checkpoint.build_model(), scale=config.model.scale, color=config.data.color, tile=tile)

    def model_space(self, lr: torch.Tensor) -> torch.Tensor:
        """LR in model space (1, C, h, w) -> SR (1, C, h*s, w*s), clamped to [0, 1]."""
        return upscale_tiled(self.model, lr, self.scale, tile=self.tile, margin=self.margin).clamp(0, 1)

    @torch.no_grad()
    def rgb(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (3, h, w) -> uint8 RGB (3, h*s, w*s), a view of an (h*s, w*s, 3) array (as image files
        hold pixels). Tile by tile from the 8-bit input to the 8-bit output, chroma included: memory beyond
        the two images is a few tiles' worth, whatever the image size."""
        _, height, width = image.shape
        scale, device = self.scale, next(self.model.parameters()).device
        output = torch.empty(height * scale, width * scale, 3, dtype=torch.uint8)
        margin = self.margin if self.color == "rgb" else max(self.margin, BICUBIC_MARGIN)
        for part in tiles(height, width, self.tile, margin):
            rows, cols = part.cut
            lr = image[None, :, rows, cols].to(device).float() / 255.0  # (1, 3, th + 2m, tw + 2m)
            sr = self._rgb_tile(lr)[(0, slice(None), *part.kept(scale))]  # (3, th*s, tw*s)
            output[part.placed(scale)] = (sr.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()
        return output.permute(2, 0, 1)

    def _rgb_tile(self, rgb: torch.Tensor) -> torch.Tensor:
        """(1, 3, h, w) RGB in [0, 1] -> (1, 3, h*s, w*s): the model on RGB, or on luma beside bicubic chroma."""
        if self.color == "rgb":
            return self.model(rgb).float().clamp(0, 1)
        ycbcr = rgb_to_ycbcr(rgb)
        luma = self.model(ycbcr[:, :1]).float().clamp(0, 1)
        chroma = imresize(ycbcr[:, 1:], scale=self.scale)
        return ycbcr_to_rgb(torch.cat([luma, chroma], dim=1))


def png_bytes(rgb: torch.Tensor) -> bytes:
    """uint8 RGB (3, H, W) as a PNG file: what ``upscale`` writes and the served model answers, byte for byte."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
