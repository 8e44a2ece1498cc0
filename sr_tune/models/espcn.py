"""ESPCN (Shi et al., "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel
Convolutional Neural Network", CVPR 2016).

On the LR image: 5x5 (64) tanh, 3x3 (32) tanh, 3x3 to C * r^2, then a pixel shuffle to (C, h*r, w*r).
"""

from __future__ import annotations

import torch
from torch import nn

from sr_tune.models._layers import check_scale, conv
from sr_tune.models.registry import register_model


class ESPCN(nn.Module):
    def __init__(self, *, scale: int, in_channels: int = 1, widths: tuple[int, int] = (64, 32)) -> None:
        super().__init__()
        check_scale("ESPCN", scale)
        n1, n2 = widths
        self.features = nn.Sequential(conv(in_channels, n1, 5), nn.Tanh(), conv(n1, n2, 3), nn.Tanh())
        self.to_subpixels = conv(n2, in_channels * scale * scale, 3)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        x = self.to_subpixels(self.features(lr))  # (B, C*r*r, h, w)
        return self.shuffle(x)  # (B, C, h*r, w*r)


@register_model
def espcn(scale: int, in_channels: int = 1) -> ESPCN:
    """ESPCN: 5x5 64, 3x3 32 (tanh), 3x3 to C*r^2 and a pixel shuffle, all at LR resolution."""
    return ESPCN(scale=scale, in_channels=in_channels)
