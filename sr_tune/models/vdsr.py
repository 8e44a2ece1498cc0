"""VDSR (Kim et al., "Accurate Image Super-Resolution Using Very Deep Convolutional Networks", CVPR 2016).

20 3x3 convolutions of width 64 with ReLU on the bicubic-upscaled image; the network predicts the
residual, which is added back to the bicubic input (global residual learning). The paper trains it with
a high learning rate and gradient clipping, which the training config provides.
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from sr_tune.data.degrade import imresize
from sr_tune.models._layers import check_scale, conv
from sr_tune.models.registry import MAX_COUNT, AtLeast, register_model


class VDSR(nn.Module):
    def __init__(self, *, scale: int, in_channels: int = 1, depth: int = 20, width: int = 64) -> None:
        super().__init__()
        check_scale("VDSR", scale)
        if depth < 2:
            raise ValueError(f"VDSR depth must be >= 2, got {depth}")
        self.scale = scale
        layers: list[nn.Module] = [conv(in_channels, width, 3), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [conv(width, width, 3), nn.ReLU(inplace=True)]
        layers.append(conv(width, in_channels, 3))
        self.residual = nn.Sequential(*layers)
        for module in self.residual:
            if isinstance(module, nn.Conv2d):  # He initialisation, as in the paper
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.after_bicubic(imresize(lr, scale=self.scale))  # (B, C, h*s, w*s)

    def after_bicubic(self, upscaled: torch.Tensor) -> torch.Tensor:
        """The network on the bicubic-upscaled image (B, C, H, W): the graph an export holds."""
        return upscaled + self.residual(upscaled)


@register_model
def vdsr(scale: int, in_channels: int = 1, depth: Annotated[int, AtLeast(2, maximum=MAX_COUNT)] = 20) -> VDSR:
    """VDSR: 20 3x3 convs of 64 predicting the residual over the bicubic upscale."""
    return VDSR(scale=scale, in_channels=in_channels, depth=depth)
