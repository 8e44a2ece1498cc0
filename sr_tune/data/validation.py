"""Validation pairs by the benchmark protocol: HR cropped to a multiple of the scale, shipped LR when present.

Where a source ships LR images for the scale (DIV2K, benchmark folders), they are used as they are, and
the HR is cut to exactly ``scale`` times their size (MATLAB's ``modcrop``). Otherwise LR is the
MATLAB-compatible bicubic downscale of that HR. An optional centre crop keeps evaluation cheap during
training; it is aligned to the LR grid so that shipped LR and HR stay in register. ``quantize_lr`` rounds
LR to 8-bit levels in model space (for Y, as MATLAB's ``rgb2ycbcr`` of a uint8 image): what published
numbers are computed on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sr_tune.data.degrade import degrade, imresize, to_8bit
from sr_tune.data.sampler import to_model_space
from sr_tune.data.sources import SRImage
from sr_tune.metrics import psnr, rgb_to_ycbcr, ssim


@dataclass(frozen=True)
class ValidationPair:
    name: str
    lr: torch.Tensor  # float (1, C, h, w)
    hr: torch.Tensor  # float (1, C, h * scale, w * scale)
    shipped_lr: bool  # LR read from the source rather than made by bicubic
    chroma: torch.Tensor | None = None  # Y pairs: the LR's CbCr (1, 2, h, w), to show results in colour


def _centred(length: int, crop: int) -> slice:
    """The centred ``crop`` (all when 0 or longer) of ``length`` positions."""
    keep = length if crop <= 0 else min(crop, length)
    start = (length - keep) // 2
    return slice(start, start + keep)


def validation_pairs(
    images: Sequence[SRImage],
    *,
    scale: int,
    color: str,
    crop: int = 0,
    blur_sigma: float = 0.0,
    quantize_lr: bool = False,
    device: torch.device | str = "cpu",
) -> list[ValidationPair]:
    """One pair per image; ``crop`` is the HR side of a centre crop (0 = the whole image)."""
    pairs = []
    for image in images:
        lr_height, lr_width = image.hr.shape[1] // scale, image.hr.shape[2] // scale
        rows, cols = _centred(lr_height, crop // scale), _centred(lr_width, crop // scale)
        hr_rows = slice(rows.start * scale, rows.stop * scale)
        hr_cols = slice(cols.start * scale, cols.stop * scale)
        # uint8 into to_model_space, as the training patches go: the same pixel gets the same Y in both.
        hr_pixels = image.hr[None, :, hr_rows, hr_cols].to(device)  # (1, 3, H, W) uint8
        lr_pixels = image.lr[scale][None, :, rows, cols].to(device) if scale in image.lr else None
        hr_rgb = hr_pixels.float() / 255.0
        lr_rgb = lr_pixels.float() / 255.0 if lr_pixels is not None else None
        hr = to_model_space(hr_pixels, color)
        lr = to_model_space(lr_pixels, color) if lr_pixels is not None else degrade(hr, scale, blur_sigma=blur_sigma)
        chroma = None
        if color == "y":  # colour previews show the model's Y with the LR's own chroma
            source = lr_rgb if lr_rgb is not None else degrade(hr_rgb, scale, blur_sigma=blur_sigma)
            chroma = rgb_to_ycbcr(source)[:, 1:]
        pairs.append(
            ValidationPair(
                name=image.name,
                lr=to_8bit(lr) if quantize_lr else lr,
                hr=hr,
                shipped_lr=lr_rgb is not None,
                chroma=chroma,
            )
        )
    return pairs


def protocol_scores(
    sr: torch.Tensor, pair: ValidationPair, scale: int, *, eight_bit: bool
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """The benchmark protocol for one pair: the model's output ``sr`` (1, C, H, W) beside bicubic of the same
    LR, both clamped to [0, 1] and, with ``eight_bit``, rounded to 8-bit levels as a saved image would be;
    PSNR and SSIM on Y with a ``scale``-pixel border crop. Returns ({psnr, ssim, bicubic_psnr, bicubic_ssim},
    sr and bicubic as they were measured)."""
    sr, bicubic = sr.float().clamp(0, 1), imresize(pair.lr, scale=scale).clamp(0, 1)
    if eight_bit:
        sr, bicubic = to_8bit(sr), to_8bit(bicubic)
    scores = {}
    for prefix, output in (("", sr), ("bicubic_", bicubic)):
        scores[f"{prefix}psnr"] = psnr(output, pair.hr, crop_border=scale, y_channel=True).item()
        scores[f"{prefix}ssim"] = ssim(output, pair.hr, crop_border=scale, y_channel=True).item()
    return scores, sr, bicubic
