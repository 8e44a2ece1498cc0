"""FSRCNN (Dong et al., "Accelerating the Super-Resolution Convolutional Neural Network", ECCV 2016).

Works on the LR image directly: feature extraction 5x5 (d), shrinking 1x1 (s), m mapping layers 3x3 (s),
expanding 1x1 (d), all with PReLU, then a 9x9 transposed convolution with stride = scale.
FSRCNN(56, 12, 4) has 12,464 weights (no biases, no PReLU slopes) at x3 on one channel.
"""

from __future__ import annotations

import torch
from torch import nn

from sr_tune.models._layers import check_scale, conv
from sr_tune.models.registry import Count, register_model


class FSRCNN(nn.Module):
    def __init__(self, *, scale: int, in_channels: int = 1, d: int = 56, s: int = 12, m: int = 4) -> None:
        super().__init__()
        check_scale("FSRCNN", scale)
        layers: list[nn.Module] = [conv(in_channels, d, 5), nn.PReLU(d), conv(d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            layers += [conv(s, s, 3), nn.PReLU(s)]
        layers += [conv(s, d, 1), nn.PReLU(d)]
        self.body = nn.Sequential(*layers)
        # Output size (h - 1) * scale - 2 * 4 + 9 + (scale - 1) = h * scale.
        self.deconv = nn.ConvTranspose2d(d, in_channels, 9, stride=scale, padding=4, output_padding=scale - 1)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.body(lr))  # (B, d, h, w) -> (B, C, h*s, w*s)


@register_model
def fsrcnn(scale: int, in_channels: int = 1, d: Count = 56, s: Count = 12, m: Count = 4) -> FSRCNN:
    """FSRCNN(d, s, m); the defaults are the paper's FSRCNN(56, 12, 4)."""
    return FSRCNN(scale=scale, in_channels=in_channels, d=d, s=s, m=m)


@register_model
def fsrcnn_s(scale: int, in_channels: int = 1) -> FSRCNN:
    """FSRCNN-s(32, 5, 1), the paper's real-time variant."""
    return FSRCNN(scale=scale, in_channels=in_channels, d=32, s=5, m=1)
