"""Small building blocks shared by model families (kept here so each family file stays self-describing)."""

from __future__ import annotations

from torch import nn

SUPPORTED_SCALES = (2, 3, 4)


def check_scale(model: str, scale: int, supported: tuple[int, ...] = SUPPORTED_SCALES) -> None:
    if scale not in supported:
        raise ValueError(f"{model} supports scale {', '.join(map(str, supported))}; got {scale!r}")


def pixel_shuffle_stages(scale: int) -> list[int]:
    """Sub-pixel stages of an upsampler: x2 -> [2], x3 -> [3], x4 -> [2, 2] (SRResNet / EDSR)."""
    return [2, 2] if scale == 4 else [scale]


def conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    """'Same' convolution (stride 1, zero padding k // 2): spatial size in = size out."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
