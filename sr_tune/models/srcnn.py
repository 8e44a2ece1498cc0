"""SRCNN (Dong et al., "Image Super-Resolution Using Deep Convolutional Networks", TPAMI 2016).

Three convolutions on the bicubic-upscaled image: patch extraction (f1 x f1, n1 filters), non-linear
mapping (f2 x f2, n2 filters), reconstruction (f3 x f3). The paper trains without padding; we pad
('same') so that the output covers the whole HR image, the shape every model in the zoo shares.
"""

from __future__ import annotations

import torch
from torch import nn

from sr_tune.data.degrade import imresize
from sr_tune.models._layers import check_scale, conv
from sr_tune.models.registry import register_model


class SRCNN(nn.Module):
    def __init__(
        self,
        *,
        scale: int,
        in_channels: int = 1,
        kernel_sizes: tuple[int, int, int] = (9, 1, 5),
        widths: tuple[int, int] = (64, 32),
    ) -> None:
        super().__init__()
        check_scale("SRCNN", scale)
        self.scale = scale
        f1, f2, f3 = kernel_sizes
        n1, n2 = widths
        self.extract = conv(in_channels, n1, f1)
        self.map = conv(n1, n2, f2)
        self.reconstruct = conv(n2, in_channels, f3)
        self.act = nn.ReLU(inplace=True)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.after_bicubic(imresize(lr, scale=self.scale))  # (B, C, h*s, w*s) MATLAB bicubic, as in the paper

    def after_bicubic(self, upscaled: torch.Tensor) -> torch.Tensor:
        """The network on the bicubic-upscaled image (B, C, H, W): the graph an export holds."""
        x = self.act(self.extract(upscaled))  # (B, n1, H, W)
        x = self.act(self.map(x))  # (B, n2, H, W)
        return self.reconstruct(x)  # (B, C, H, W)


@register_model
def srcnn_915(scale: int, in_channels: int = 1) -> SRCNN:
    """The base 9-1-5 network (n1 = 64, n2 = 32): 8,032 weights on Y."""
    return SRCNN(scale=scale, in_channels=in_channels, kernel_sizes=(9, 1, 5))


@register_model
def srcnn_955(scale: int, in_channels: int = 1) -> SRCNN:
    """The larger 9-5-5 mapping (n1 = 64, n2 = 32): 57,184 weights on Y."""
    return SRCNN(scale=scale, in_channels=in_channels, kernel_sizes=(9, 5, 5))


@register_model
def srcnn_ex(scale: int, in_channels: int = 3) -> SRCNN:
    """SRCNN-Ex: 9-5-5 trained on all three RGB channels (the paper's Section 4.3)."""
    return SRCNN(scale=scale, in_channels=in_channels, kernel_sizes=(9, 5, 5))
