"""Plain 3x3 CNNs from the seed report "Image Super-Resolution Using Convolutional Neural Network".

Stacks of 'same' 3x3 convolutions with ReLU between them on the bicubic-upscaled image. The report
tabulates four networks by per-layer channels:

    CNN_SMALL    1-8-16-3                  (80 / 1,168 / 435 parameters per layer)
    CNN_MEDIUM   1-16-32-64-32-3
    CNN_DEEP     1-32-64-128-128-64-32-3
    waifu2x CNN  1-32-32-64-64-128-128-3

The tables map a 1-channel input to 3 output channels; those exact counts come out with
``in_channels=1, out_channels=3``. The zoo's shape contract (C in = C out) is the default:
``out_channels`` falls back to ``in_channels``, which changes only the last layer's count.
"""

from __future__ import annotations

import torch
from torch import nn

from sr_tune.data.degrade import imresize
from sr_tune.models._layers import check_scale, conv
from sr_tune.models.registry import Count, register_model


class PlainCNN(nn.Module):
    def __init__(
        self,
        *,
        scale: int,
        hidden: tuple[int, ...],
        in_channels: int = 1,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        check_scale("PlainCNN", scale)
        self.scale = scale
        widths = [in_channels, *hidden, out_channels or in_channels]
        layers: list[nn.Module] = []
        for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(conv(n_in, n_out, 3))
            if index < len(widths) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.after_bicubic(imresize(lr, scale=self.scale))  # (B, C, h*s, w*s)

    def after_bicubic(self, upscaled: torch.Tensor) -> torch.Tensor:
        """The network on the bicubic-upscaled image: (B, C, H, W) -> (B, C_out, H, W), the graph an export holds."""
        return self.body(upscaled)


@register_model
def cnn_small(scale: int, in_channels: int = 1, out_channels: Count | None = None) -> PlainCNN:
    """CNN_SMALL: 3x3 convs C-8-16-C with ReLU on the bicubic upscale (report table: 1-8-16-3)."""
    return PlainCNN(scale=scale, hidden=(8, 16), in_channels=in_channels, out_channels=out_channels)


@register_model
def cnn_medium(scale: int, in_channels: int = 1, out_channels: Count | None = None) -> PlainCNN:
    """CNN_MEDIUM: 3x3 convs C-16-32-64-32-C with ReLU on the bicubic upscale."""
    return PlainCNN(scale=scale, hidden=(16, 32, 64, 32), in_channels=in_channels, out_channels=out_channels)


@register_model
def cnn_deep(scale: int, in_channels: int = 1, out_channels: Count | None = None) -> PlainCNN:
    """CNN_DEEP: 3x3 convs C-32-64-128-128-64-32-C with ReLU on the bicubic upscale."""
    return PlainCNN(scale=scale, hidden=(32, 64, 128, 128, 64, 32), in_channels=in_channels, out_channels=out_channels)


@register_model
def waifu2x_cnn(scale: int, in_channels: int = 1, out_channels: Count | None = None) -> PlainCNN:
    """The report's "waifu2x CNN": vgg_7's widths, but padded, ReLU and bicubic input (see waifu2x.py)."""
    return PlainCNN(scale=scale, hidden=(32, 32, 64, 64, 128, 128), in_channels=in_channels, out_channels=out_channels)
