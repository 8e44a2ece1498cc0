"""PSNR and SSIM with the conventions of the SR literature, batched on any device.

Conventions (the ones behind the SRCNN/VDSR/EDSR tables):
- inputs are float tensors in [0, 1], shaped (B, C, H, W) or (C, H, W); one value per image comes back;
- ``crop_border`` pixels are removed from every side first (SR papers crop ``scale`` pixels);
- ``y_channel=True`` converts RGB to the luma of ITU-R BT.601 as MATLAB's ``rgb2ycbcr`` does
  (Y in [16/255, 235/255]); a 1-channel input is taken to be Y already;
- everything is computed in float64, so results match scikit-image to ~1e-12.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# MATLAB rgb2ycbcr luma row for R, G, B in [0, 1]; the result is in [0, 255] before the /255.
_BT601_Y = (65.481, 128.553, 24.966)
_BT601_OFFSET = 16.0

# Wang et al. 2004: 11x11 Gaussian window with sigma 1.5 (scikit-image: truncate 3.5 -> radius 5).
_SSIM_RADIUS = 5
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of (..., 3, H, W) RGB in [0, 1], as MATLAB ``rgb2ycbcr``: (..., 1, H, W) in [16/255, 235/255]."""
    if rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_y needs 3 channels in dim -3, got shape {tuple(rgb.shape)}")
    red, green, blue = rgb.split(1, dim=-3)  # Python-number weights: no host-to-device copy per call
    return (red * _BT601_Y[0] + green * _BT601_Y[1] + blue * _BT601_Y[2] + _BT601_OFFSET) / 255.0


def uint8_rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """``rgb_to_y`` of uint8 (..., 3, H, W) RGB in [0, 255], within float rounding: one conversion, then the
    weights (folded with both /255) applied in place. 4 ops instead of 9, and a pixel's value does not depend
    on the layout or the batch, so the sampler's Y bank and validation give the same pixel the same Y."""
    if images.shape[-3] != 3:
        raise ValueError(f"uint8_rgb_to_y needs 3 channels in dim -3, got shape {tuple(images.shape)}")
    red, green, blue = images.movedim(-3, -1).float().unbind(-1)  # each (..., H, W)
    luma = torch.add(red * (_BT601_Y[0] / 255**2), green, alpha=_BT601_Y[1] / 255**2)
    luma.add_(blue, alpha=_BT601_Y[2] / 255**2).add_(_BT601_OFFSET / 255)
    return luma.unsqueeze(-3)


# MATLAB rgb2ycbcr chroma rows; Cb and Cr are offset by 128 (in [0, 255] before the /255).
_BT601_CB = (-37.797, -74.203, 112.0)
_BT601_CR = (112.0, -93.786, -18.214)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> YCbCr as MATLAB ``rgb2ycbcr`` (studio range), in [0, 1]."""
    matrix = torch.tensor([_BT601_Y, _BT601_CB, _BT601_CR], dtype=rgb.dtype, device=rgb.device)
    offset = torch.tensor([_BT601_OFFSET, 128.0, 128.0], dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (torch.einsum("ij,...jhw->...ihw", matrix, rgb) + offset) / 255.0


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_ycbcr`` (MATLAB ``ycbcr2rgb``); not clamped."""
    matrix = torch.tensor([_BT601_Y, _BT601_CB, _BT601_CR], dtype=torch.float64)
    inverse = torch.linalg.inv(matrix).to(ycbcr.dtype).to(ycbcr.device)
    offset = torch.tensor([_BT601_OFFSET, 128.0, 128.0], dtype=ycbcr.dtype, device=ycbcr.device).view(3, 1, 1)
    return torch.einsum("ij,...jhw->...ihw", inverse, ycbcr * 255.0 - offset)


def _prepare(
    sr: torch.Tensor, hr: torch.Tensor, crop_border: int, y_channel: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, batch, crop and colour-convert both images; returns float64 (B, C, H', W')."""
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if sr.dim() not in (3, 4):
        raise ValueError(f"expected (B, C, H, W) or (C, H, W), got shape {tuple(sr.shape)}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    sr, hr = sr.to(torch.float64), hr.to(torch.float64)
    if sr.dim() == 3:
        sr, hr = sr.unsqueeze(0), hr.unsqueeze(0)
    if y_channel and sr.shape[1] == 3:
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    elif y_channel and sr.shape[1] != 1:
        raise ValueError(f"y_channel needs 1 or 3 channels, got {sr.shape[1]}")
    if crop_border:
        h, w = sr.shape[-2:]
        if h <= 2 * crop_border or w <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {h}x{w} image")
        sr = sr[..., crop_border:-crop_border, crop_border:-crop_border]
        hr = hr[..., crop_border:-crop_border, crop_border:-crop_border]
    return sr, hr


def psnr(
    sr: torch.Tensor,
    hr: torch.Tensor,
    *,
    crop_border: int = 0,
    y_channel: bool = False,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, ``10 log10(data_range^2 / MSE)``; shape (B,) float64.

    Identical images give ``inf``, as in scikit-image.
    """
    sr, hr = _prepare(sr, hr, crop_border, y_channel)
    mse = (sr - hr).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    taps = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=dtype, device=device)
    window = torch.exp(-0.5 * (taps / _SSIM_SIGMA) ** 2)
    return window / window.sum()  # (11,)


def ssim(
    sr: torch.Tensor,
    hr: torch.Tensor,
    *,
    crop_border: int = 0,
    y_channel: bool = False,
    data_range: float = 1.0,
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, averaged over channels; shape (B,) float64.

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population covariances, mean over the
    window positions that lie fully inside the image: equal to scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    """
    sr, hr = _prepare(sr, hr, crop_border, y_channel)
    batch, channels, h, w = sr.shape
    if min(h, w) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least 11x11 after cropping, got {h}x{w}")
    window = _gaussian_window(sr.dtype, sr.device)
    row_filter = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    col_filter = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        # Valid separable filtering per channel: (B, C, H, W) -> (B, C, H-10, W-10).
        return F.conv2d(F.conv2d(x, row_filter, groups=channels), col_filter, groups=channels)

    mu_x, mu_y = local_mean(sr), local_mean(hr)
    var_x = local_mean(sr * sr) - mu_x * mu_x
    var_y = local_mean(hr * hr) - mu_y * mu_y
    cov_xy = local_mean(sr * hr) - mu_x * mu_y
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))
