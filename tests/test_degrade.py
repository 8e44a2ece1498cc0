"""The MATLAB-compatible resize against real MATLAB answers, and where torch's bicubic differs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch

from sr_tune.data.degrade import degrade, gaussian_blur, imresize

from .conftest import GOLDEN

_ARCHIVE = np.load(GOLDEN)
CASES = sorted({key.split("__")[0] for key in _ARCHIVE.files})


def golden(name: str) -> tuple[torch.Tensor, np.ndarray, tuple[int, int], bool]:
    """(input as (..., H, W) tensor, MATLAB output (H, W[, C]), target size, antialiasing)."""
    x = torch.from_numpy(_ARCHIVE[f"{name}__input"])
    if x.dim() == 3:
        x = x.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    size = tuple(int(s) for s in _ARCHIVE[f"{name}__shape"])
    return x, _ARCHIVE[f"{name}__output"], size, bool(_ARCHIVE[f"{name}__antialiasing"])


def to_numpy(y: torch.Tensor) -> np.ndarray:
    return (y.permute(1, 2, 0) if y.dim() == 3 else y).double().numpy()


def test_golden_file_covers_up_down_aa_and_odd_sizes():
    assert len(CASES) == 16
    sizes = [golden(c)[0].shape[-2:] for c in CASES]
    assert any(h % 2 for h, _ in sizes)  # 15x15 inputs
    kinds = {(c.startswith("up"), golden(c)[3]) for c in CASES}
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}


@pytest.mark.parametrize("case", CASES)
def test_float64_matches_matlab(case):
    x, expected, size, antialias = golden(case)
    result = imresize(x, size=size, antialias=antialias)
    assert result.dtype == torch.float64
    assert np.abs(to_numpy(result) - expected).max() < 1e-10


@pytest.mark.parametrize("case", CASES)
def test_float32_matches_matlab_on_image_range(case):
    # float32 has a spacing of 1.5e-5 at 224, so an absolute 1e-5 is only meaningful on image-range data:
    # the resize is linear, so scale the ramps to [0, 1] (photographs already are).
    x, expected, size, antialias = golden(case)
    peak = float(x.abs().max())
    result = imresize((x / peak).float(), size=size, antialias=antialias)
    assert result.dtype == torch.float32
    assert np.abs(to_numpy(result) * peak - expected).max() / peak < 1e-5


@pytest.mark.parametrize(
    ("case", "scale"),
    [("down_down_x2_aa", 1 / 2), ("down_down_x3_aa", 1 / 3), ("down_down_x4_aa", 1 / 4), ("down_down_x5_aa", 1 / 5)],
)
def test_scale_argument_matches_matlab(case, scale):
    x, expected, _, antialias = golden(case)
    result = imresize(x, scale=scale, antialias=antialias)
    assert result.shape[-2:] == expected.shape[:2]
    assert np.abs(to_numpy(result) - expected).max() < 1e-10


def test_batched_and_leading_axes_match_per_image():
    x, expected, size, antialias = golden("down_down_butterfly_irregular_aa")
    batch = torch.stack([x, x.flip(-1)])  # (2, 3, 256, 256)
    result = imresize(batch, size=size, antialias=antialias)
    assert result.shape == (2, 3, *size)
    assert np.abs(to_numpy(result[0]) - expected).max() < 1e-10
    torch.testing.assert_close(result[1], imresize(x.flip(-1), size=size, antialias=antialias))


def test_torch_bicubic_differs_from_matlab():
    """Why we do not use F.interpolate: a = -0.75 and different antialias support and borders."""
    x, expected, size, _ = golden("down_down_butterfly_irregular_aa")
    ours = to_numpy(imresize(x, size=size))
    theirs = to_numpy(torch.nn.functional.interpolate(x[None], size=size, mode="bicubic", antialias=True)[0])
    assert np.abs(ours - expected).max() < 1e-10
    assert np.abs(theirs - expected).max() > 0.03  # 0.044 on a [0, 1] photograph
    x, expected, size, _ = golden("up_up_irregular_noaa")
    theirs = torch.nn.functional.interpolate(x[None, None], size=size, mode="bicubic")[0, 0].numpy()
    assert np.abs(theirs - expected).max() > 0.1  # 0.43 on values up to 63.5


def test_downscale_then_upscale_keeps_size_and_range_of_a_photo(photos):
    hr = photos["coffee"][:, :399, :597]  # odd sizes, multiples of 3
    lr = imresize(hr, scale=1 / 3)
    assert lr.shape == (3, 133, 199)
    assert imresize(lr, scale=3).shape == hr.shape
    assert -0.1 < float(lr.min()) and float(lr.max()) < 1.1  # bicubic overshoots a little, never wildly


def test_fractional_upscale_size_is_matlab_ceil():
    x = torch.rand(1, 10, 7, dtype=torch.float64)
    assert imresize(x, scale=1.5).shape == (1, 15, 11)  # ceil(10.5) = 11
    assert imresize(x, scale=(2.0, 0.5)).shape == (1, 20, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"scale": 2, "size": (4, 4)}, "exactly one"),
        ({"scale": -1}, "positive"),
        ({"size": (0, 3)}, "positive"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        imresize(torch.rand(4, 4, dtype=torch.float64), **kwargs)


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match="floating"):
        imresize(torch.zeros(4, 4, dtype=torch.uint8), scale=2)


@pytest.mark.parametrize("sigma", [0.6, 0.8, 1.0, 1.5, 2.0])
def test_gaussian_blur_matches_scipy_symmetric(sigma):
    x = torch.rand(2, 23, 17, dtype=torch.float64)
    ours = gaussian_blur(x, sigma)
    reference = np.stack([scipy.ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=3.0) for a in x.numpy()])
    assert np.abs(ours.numpy() - reference).max() < 1e-12


def test_degrade_is_bicubic_downscale_without_blur_and_checks_multiples(photos):
    hr = photos["rocket"][:, :426, :639]
    lr = degrade(hr, 3)
    torch.testing.assert_close(lr, imresize(hr, size=(142, 213)), rtol=0, atol=0)
    blurred = degrade(hr, 3, blur_sigma=1.0)
    assert float((blurred - lr).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="not a multiple of scale 3"):
        degrade(photos["rocket"][:, :427, :639], 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x, expected, size, antialias = golden("down_down_butterfly_irregular_aa")
    result = imresize(x.cuda(), size=size, antialias=antialias).cpu()
    assert np.abs(to_numpy(result) - expected).max() < 1e-10
