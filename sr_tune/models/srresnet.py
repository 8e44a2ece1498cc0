"""SRResNet and the SRGAN discriminator (Ledig et al., "Photo-Realistic Single Image Super-Resolution
Using a Generative Adversarial Network", CVPR 2017).

SRResNet is also SRGAN's generator: 9x9 head with PReLU, 16 residual blocks (conv-BN-PReLU-conv-BN),
conv-BN and a long skip, sub-pixel upsampling (x2 per stage; x3 as one stage), 9x9 tail.
"""

from __future__ import annotations

import torch
from torch import nn

from sr_tune.models._layers import check_scale, conv, pixel_shuffle_stages
from sr_tune.models.registry import Count, register_model


class ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv(width, width, 3),
            nn.BatchNorm2d(width),
            nn.PReLU(width),
            conv(width, width, 3),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    def __init__(self, *, scale: int, in_channels: int = 3, num_blocks: int = 16, width: int = 64) -> None:
        super().__init__()
        check_scale("SRResNet", scale)
        self.head = nn.Sequential(conv(in_channels, width, 9), nn.PReLU(width))
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(num_blocks)))
        self.fuse = nn.Sequential(conv(width, width, 3), nn.BatchNorm2d(width))
        upsample: list[nn.Module] = []
        for factor in pixel_shuffle_stages(scale):
            # (B, width, h, w) -> (B, width * f^2, h, w) -> (B, width, h*f, w*f)
            upsample += [conv(width, width * factor * factor, 3), nn.PixelShuffle(factor), nn.PReLU(width)]
        self.upsample = nn.Sequential(*upsample)
        self.tail = conv(width, in_channels, 9)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        features = self.head(lr)  # (B, 64, h, w)
        features = features + self.fuse(self.blocks(features))  # long skip
        return self.tail(self.upsample(features))  # (B, C, h*s, w*s)


@register_model
def srresnet(scale: int, in_channels: int = 3, num_blocks: Count = 16) -> SRResNet:
    """SRResNet (= SRGAN generator); 16 blocks of width 64 by default."""
    return SRResNet(scale=scale, in_channels=in_channels, num_blocks=num_blocks)


class SRGANDiscriminator(nn.Module):
    """SRGAN's discriminator: 8 3x3 convs (64, 64, 128, 128, 256, 256, 512, 512; every second one has
    stride 2), BN after all but the first, LeakyReLU 0.2, dense 1024, LeakyReLU, dense 1 (a logit).

    The paper's 96x96 patches leave a 6x6 map before the dense head; adaptive average pooling to 6x6
    keeps that head (and its 18,432 inputs) for any HR patch size.
    """

    def __init__(self, *, in_channels: int = 3, base_width: int = 64) -> None:
        super().__init__()
        widths = [
            base_width,
            base_width,
            2 * base_width,
            2 * base_width,
            4 * base_width,
            4 * base_width,
            8 * base_width,
            8 * base_width,
        ]
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(widths):
            stride = 2 if index % 2 == 1 else 1
            layers.append(nn.Conv2d(previous, width, 3, stride=stride, padding=1))
            if index > 0:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            previous = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(previous * 6 * 6, 1024), nn.LeakyReLU(0.2, inplace=True), nn.Linear(1024, 1)
        )

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(hr))  # (B, 512, 6, 6)
        return self.head(x).squeeze(1)  # (B,) logits: real > 0 > fake
