"""Inference on images of any size: overlapping tiles whose seams vanish, memory bounded by the tile size.

Each LR tile is cut with a margin of the model's receptive radius on every side (clipped at the image
border), run through the model, and only its centre is kept. Every kept output pixel therefore saw
exactly the context it would see in a whole-image pass, so the result equals whole-image inference up to
float rounding, while the model never sees more than (tile + 2 * margin)^2 LR pixels at once.
"""

from __future__ import annotations

import torch
from torch import nn

from sr_tune.data.degrade import imresize
from sr_tune.metrics import rgb_to_ycbcr, ycbcr_to_rgb


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


@torch.no_grad()
def upscale_tiled(model: nn.Module, lr: torch.Tensor, scale: int, *, tile: int = 256, margin: int) -> torch.Tensor:
    """(1, C, H, W) LR -> (1, C, H*s, W*s) on the CPU, in tiles of ``tile`` LR pixels with ``margin`` of context."""
    device = next(model.parameters()).device
    _, channels, height, width = lr.shape
    output = torch.empty(1, channels, height * scale, width * scale)
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            in_top, in_left = max(top - margin, 0), max(left - margin, 0)
            in_bottom, in_right = min(bottom + margin, height), min(right + margin, width)
            sr = model(lr[:, :, in_top:in_bottom, in_left:in_right].to(device)).float().cpu()
            rows = slice((top - in_top) * scale, (bottom - in_top) * scale)
            cols = slice((left - in_left) * scale, (right - in_left) * scale)
            output[:, :, top * scale : bottom * scale, left * scale : right * scale] = sr[:, :, rows, cols]
    return output


class Upscaler:
    """A trained model ready for images of any size: Y models upscale luma with the network and chroma
    with bicubic (the SRCNN convention); RGB models upscale all three channels."""

    def __init__(self, model: nn.Module, *, scale: int, color: str, tile: int = 256) -> None:
        self.model, self.scale, self.color, self.tile = model.eval(), scale, color, tile
        with torch.enable_grad():
            self.margin = receptive_radius(model, 1 if color == "y" else 3)

    def model_space(self, lr: torch.Tensor) -> torch.Tensor:
        """LR in model space (1, C, h, w) -> SR (1, C, h*s, w*s), clamped to [0, 1]."""
        return upscale_tiled(self.model, lr, self.scale, tile=self.tile, margin=self.margin).clamp(0, 1)

    def rgb(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (3, h, w) -> uint8 RGB (3, h*s, w*s)."""
        rgb = image[None].float() / 255.0
        if self.color == "rgb":
            sr = self.model_space(rgb)
        else:
            ycbcr = rgb_to_ycbcr(rgb)
            luma = self.model_space(ycbcr[:, :1])
            chroma = imresize(ycbcr[:, 1:], scale=self.scale)
            sr = ycbcr_to_rgb(torch.cat([luma, chroma], dim=1))
        return (sr[0].clamp(0, 1) * 255).round().to(torch.uint8)
