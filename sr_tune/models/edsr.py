"""EDSR-baseline (Lim et al., "Enhanced Deep Residual Networks for Single Image Super-Resolution",
CVPRW 2017).

SRResNet without batch norm and without activations outside the residual blocks: 3x3 head, 16 blocks
(conv-ReLU-conv, optionally scaled by ``res_scale``; the paper's large model uses 0.1), 3x3 conv and a long
skip, sub-pixel upsampler, 3x3 tail. RGB inputs are centred on the DIV2K mean (a fixed, untrained shift).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from sr_tune.models._layers import check_scale, conv, pixel_shuffle_stages
from sr_tune.models.registry import AtLeast, Count, register_model

DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


class EDSRBlock(nn.Module):
    def __init__(self, width: int, res_scale: float) -> None:
        super().__init__()
        self.body = nn.Sequential(conv(width, width, 3), nn.ReLU(inplace=True), conv(width, width, 3))
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) * self.res_scale


class EDSR(nn.Module):
    def __init__(
        self, *, scale: int, in_channels: int = 3, num_blocks: int = 16, width: int = 64, res_scale: float = 1.0
    ) -> None:
        super().__init__()
        check_scale("EDSR", scale)
        mean = DIV2K_RGB_MEAN if in_channels == 3 else (0.5,) * in_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, in_channels, 1, 1), persistent=False)
        self.head = conv(in_channels, width, 3)
        self.blocks = nn.Sequential(*(EDSRBlock(width, res_scale) for _ in range(num_blocks)))
        self.fuse = conv(width, width, 3)
        upsample: list[nn.Module] = []
        for factor in pixel_shuffle_stages(scale):
            upsample += [conv(width, width * factor * factor, 3), nn.PixelShuffle(factor)]
        self.upsample = nn.Sequential(*upsample)
        self.tail = conv(width, in_channels, 3)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        features = self.head(lr - self.mean)  # (B, 64, h, w)
        features = features + self.fuse(self.blocks(features))
        return self.tail(self.upsample(features)) + self.mean  # (B, C, h*s, w*s)


@register_model
def edsr_baseline(
    scale: int,
    in_channels: int = 3,
    res_scale: Annotated[float, AtLeast(0, exclusive=True)] = 1.0,
    num_blocks: Count = 16,
    width: Count = 64,
) -> EDSR:
    """EDSR-baseline: 16 blocks of 64, no BN; ``res_scale=0.1`` as an option; fewer or narrower blocks for a
    compute budget (``num_blocks``, ``width``)."""
    return EDSR(scale=scale, in_channels=in_channels, num_blocks=num_blocks, width=width, res_scale=res_scale)
