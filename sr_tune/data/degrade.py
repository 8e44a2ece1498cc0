"""MATLAB-compatible bicubic resize and the SR degradation built on it.

SR papers make their LR images with MATLAB's ``imresize(x, 1/s, 'bicubic')``; PSNR tables are only
comparable when LR is made the same way. ``torch.nn.functional.interpolate(mode="bicubic")`` is not
that: it uses a = -0.75, and even with ``antialias=True`` its boundary handling and kernel support differ
(see ``tests/test_degrade.py`` for the numbers).

The resize is separable. For each resized axis we build the dense ``(out, in)`` matrix of MATLAB's
``contributions()`` (Keys cubic kernel with a = -0.5, widened by 1/scale when shrinking with
antialiasing, index map ``u = x/scale + 0.5 * (1 - 1/scale)``, symmetric boundary) and apply it with one
matmul, which is fast on CPU and GPU for the batch-of-patches shapes SR training uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

# MATLAB's bicubic kernel spans [-2, 2] before widening.
_KERNEL_WIDTH = 4.0


def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys (1981) cubic convolution kernel with a = -0.5, as in MATLAB's imresize."""
    absx = x.abs()
    absx2 = absx * absx
    absx3 = absx2 * absx
    inner = (1.5 * absx3 - 2.5 * absx2 + 1.0) * (absx <= 1)
    outer = (-0.5 * absx3 + 2.5 * absx2 - 4.0 * absx + 2.0) * ((absx > 1) & (absx <= 2))
    return inner + outer


@functools.lru_cache(maxsize=256)
def _resize_matrix(
    in_length: int, out_length: int, scale: float, antialias: bool, dtype: torch.dtype, device: str
) -> torch.Tensor:
    """Dense ``(out_length, in_length)`` matrix M with ``resized = M @ signal`` along one axis.

    Built in float64 (then cast), mirroring MATLAB's ``contributions``.
    """
    shrink_with_aa = scale < 1 and antialias
    kernel_width = _KERNEL_WIDTH / scale if shrink_with_aa else _KERNEL_WIDTH

    x = torch.arange(1, out_length + 1, dtype=torch.float64)  # MATLAB's 1-based output coordinates
    u = x / scale + 0.5 * (1 - 1 / scale)  # (out,) input coordinate of each output sample
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # (out, taps), 1-based
    distance = u[:, None] - indices
    weights = scale * _cubic(scale * distance) if shrink_with_aa else _cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)

    # Symmetric boundary: ... 2 1 | 1 2 ... n | n n-1 ... (MATLAB's aux = [1:n, n:-1:1]).
    mirror = torch.cat([torch.arange(in_length), torch.arange(in_length - 1, -1, -1)])
    zero_based = torch.remainder(indices.long() - 1, 2 * in_length)
    columns = mirror[zero_based]  # (out, taps), 0-based input index of each tap

    # Taps that fold onto the same input pixel add up.
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, columns, weights)
    return matrix.to(dtype=dtype, device=device)


def _output_sizes(
    in_size: tuple[int, int],
    scale: float | Sequence[float] | None,
    size: Sequence[int] | None,
) -> tuple[tuple[int, int], tuple[float, float]]:
    """Resolve MATLAB's ``imresize(x, scale)`` / ``imresize(x, [h w])`` into sizes and per-axis scales."""
    if (scale is None) == (size is None):
        raise ValueError("imresize needs exactly one of scale= or size=")
    if size is not None:
        if len(size) != 2 or any(int(s) < 1 for s in size):
            raise ValueError(f"imresize size= must be two positive ints (h, w), got {tuple(size)}")
        out = (int(size[0]), int(size[1]))
        return out, (out[0] / in_size[0], out[1] / in_size[1])
    scales = (float(scale), float(scale)) if isinstance(scale, (int, float)) else tuple(map(float, scale))
    if len(scales) != 2 or any(s <= 0 or not math.isfinite(s) for s in scales):
        raise ValueError(f"imresize scale= must be a positive number or (sy, sx), got {scale!r}")
    # MATLAB: ceil(scale * size). Rounding first keeps 1/3 * 99 from landing a hair above 33.
    out = tuple(math.ceil(round(s * n, 9)) for s, n in zip(scales, in_size))
    return (out[0], out[1]), (scales[0], scales[1])


def imresize(
    x: torch.Tensor,
    *,
    scale: float | Sequence[float] | None = None,
    size: Sequence[int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """Resize the last two axes of ``x`` (..., H, W) exactly like MATLAB ``imresize(..., 'bicubic')``.

    Args:
        x: floating tensor on any device; every leading axis is a batch axis. Values are not clipped,
            so callers that need [0, 1] (e.g. uint8 round trips) clamp themselves.
        scale: multiplier (``0.5`` halves, ``3`` triples), one number or ``(sy, sx)``; the output size is
            ``ceil(scale * size)`` as in MATLAB.
        size: ``(h, w)`` of the output instead of ``scale``.
        antialias: widen the kernel by ``1/scale`` when shrinking (MATLAB's default ``true``).

    Returns:
        (..., h, w) tensor of ``x``'s dtype. Computed in that dtype: float64 reproduces MATLAB to ~1e-13.
    """
    if not x.is_floating_point():
        raise TypeError(f"imresize needs a floating tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"imresize needs (..., H, W), got shape {tuple(x.shape)}")
    in_h, in_w = x.shape[-2:]
    (out_h, out_w), (scale_h, scale_w) = _output_sizes((in_h, in_w), scale, size)

    # MATLAB resizes the axis with the smallest scale first (fewest rows to carry into the second pass).
    order = ("h", "w") if scale_h <= scale_w else ("w", "h")
    device = str(x.device)
    for axis in order:
        if axis == "h" and (out_h, scale_h) != (in_h, 1.0):
            rows = _resize_matrix(in_h, out_h, scale_h, antialias, x.dtype, device)
            x = torch.matmul(rows, x)  # (out_h, in_h) @ (..., in_h, W) -> (..., out_h, W)
        elif axis == "w" and (out_w, scale_w) != (in_w, 1.0):
            cols = _resize_matrix(in_w, out_w, scale_w, antialias, x.dtype, device)
            x = torch.matmul(x, cols.T)  # (..., H, in_w) @ (in_w, out_w) -> (..., H, out_w)
    return x


def _symmetric_indices(length: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices of ``pad`` symmetric pixels (c b a | a b c) either side of an axis of ``length``."""
    mirror = torch.cat([torch.arange(length), torch.arange(length - 1, -1, -1)])
    return mirror[torch.remainder(torch.arange(-pad, length + pad), 2 * length)].to(device)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (..., H, W), radius int(3 sigma + 0.5) (scipy, truncate=3), symmetric borders.

    Used before downsampling in the SRCNN-style degradation; ``sigma <= 0`` returns ``x`` unchanged.
    """
    if sigma <= 0:
        return x
    radius = max(1, int(3 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(dtype=x.dtype, device=x.device)

    leading = x.shape[:-2]
    h, w = x.shape[-2:]
    flat = x.reshape(-1, 1, h, w)  # (N, 1, H, W): every leading axis folds into the batch
    flat = flat.index_select(2, _symmetric_indices(h, radius, x.device))  # (N, 1, H + 2r, W)
    flat = flat.index_select(3, _symmetric_indices(w, radius, x.device))  # (N, 1, H + 2r, W + 2r)
    flat = torch.nn.functional.conv2d(flat, kernel.view(1, 1, 1, -1))
    flat = torch.nn.functional.conv2d(flat, kernel.view(1, 1, -1, 1))
    return flat.reshape(*leading, h, w)


def degrade(hr: torch.Tensor, scale: int, *, blur_sigma: float = 0.0) -> torch.Tensor:
    """Make LR from HR (..., H, W): optional Gaussian blur, then MATLAB bicubic downscale by ``scale``.

    H and W must be multiples of ``scale`` so that LR * scale lines up with HR pixel for pixel.
    """
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not a multiple of scale {scale}; crop it first")
    return imresize(gaussian_blur(hr, blur_sigma), size=(h // scale, w // scale))


def to_8bit(image: torch.Tensor) -> torch.Tensor:
    """``image`` in [0, 1] rounded to the 256 levels an 8-bit file holds (still float): what a stored LR image
    or a saved output would be."""
    return (image.clamp(0, 1) * 255).round() / 255
