"""PSNR and SSIM against scikit-image on its own photographs."""

from __future__ import annotations

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sr_tune.data.degrade import imresize
from sr_tune.metrics import psnr, rgb_to_y, ssim, uint8_rgb_to_y

from .conftest import PHOTOS


def distorted(hr: torch.Tensor) -> torch.Tensor:
    """A realistic SR output: bicubic x3 down and up, clamped (sizes cropped to multiples of 3)."""
    h, w = hr.shape[-2:]
    return imresize(imresize(hr, size=(h // 3, w // 3)), size=(h, w)).clamp(0, 1)


def reference(sr: torch.Tensor, hr: torch.Tensor) -> tuple[float, float]:
    a, b = hr.permute(1, 2, 0).numpy(), sr.permute(1, 2, 0).numpy()
    if a.shape[2] == 1:
        a, b = a[:, :, 0], b[:, :, 0]
    channel = {"channel_axis": 2} if a.ndim == 3 else {}
    s = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, **channel
    )
    return peak_signal_noise_ratio(a, b, data_range=1.0), s


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("crop", [0, 3])
def test_matches_scikit_image(photos, name, y_channel, crop):
    hr = photos[name]
    sr = distorted(hr)
    # The reference sees exactly what the paper protocol says: luma first, then the border crop.
    as_reference = [rgb_to_y(t[None])[0] if y_channel else t for t in (sr, hr)]
    if crop:
        as_reference = [t[:, crop:-crop, crop:-crop] for t in as_reference]
    expected_psnr, expected_ssim = reference(*as_reference)
    got_psnr = psnr(sr, hr, crop_border=crop, y_channel=y_channel)
    got_ssim = ssim(sr, hr, crop_border=crop, y_channel=y_channel)
    assert got_psnr.shape == (1,) and got_psnr.dtype == torch.float64
    assert abs(got_psnr.item() - expected_psnr) < 1e-6
    assert abs(got_ssim.item() - expected_ssim) < 1e-6
    assert 15 < got_psnr.item() < 45 and 0.3 < got_ssim.item() < 1.0  # a real distortion, not a no-op


def test_y_is_matlab_rgb2ycbcr():
    rgb = torch.tensor([[[1.0]], [[0.0]], [[0.0]]])  # pure red
    assert rgb_to_y(rgb).item() == pytest.approx((16 + 65.481) / 255)
    white, black = torch.ones(3, 1, 1), torch.zeros(3, 1, 1)
    assert rgb_to_y(white).item() == pytest.approx(235 / 255)
    assert rgb_to_y(black).item() == pytest.approx(16 / 255)


def test_y_of_uint8_pixels_is_y_of_their_floats(photos):
    image = photos["astronaut"][:, :40, :50]  # (3, 40, 50) uint8
    channel_last = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # a crop of the sampler's bank
    for rgb in (image, channel_last, torch.stack([image, image.flip(-1)])):
        got = uint8_rgb_to_y(rgb)
        assert got.shape == (*rgb.shape[:-3], 1, 40, 50) and got.dtype == torch.float32
        torch.testing.assert_close(got, rgb_to_y(rgb.float() / 255), rtol=0, atol=1e-6)
    assert uint8_rgb_to_y(torch.full((3, 1, 1), 255, dtype=torch.uint8)).item() == pytest.approx(235 / 255)
    with pytest.raises(ValueError, match="3 channels"):
        uint8_rgb_to_y(image[:2])


def test_batch_gives_one_value_per_image_in_float64(photos):
    hr = torch.stack([photos["astronaut"], photos["astronaut"].flip(-1)]).float()  # (2, 3, 512, 512)
    sr = torch.stack([distorted(hr[0].double()), hr[1].double() * 0.9]).float()
    values = psnr(sr, hr, y_channel=True, crop_border=4)
    assert values.shape == (2,) and values.dtype == torch.float64
    assert values[0].item() == pytest.approx(psnr(sr[0], hr[0], y_channel=True, crop_border=4).item(), abs=1e-9)
    assert values[0].item() != pytest.approx(values[1].item(), abs=0.1)
    assert ssim(sr, hr).shape == (2,)


def test_identical_images_and_bad_shapes():
    x = torch.rand(1, 3, 32, 32)
    assert psnr(x, x).item() == float("inf")
    assert ssim(x, x).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, x[..., :31])
    with pytest.raises(ValueError, match="leaves nothing"):
        psnr(x, x, crop_border=16)
    with pytest.raises(ValueError, match="11x11"):
        ssim(x[..., :10, :10], x[..., :10, :10])
    with pytest.raises(ValueError, match="y_channel needs 1 or 3"):
        psnr(torch.rand(2, 2, 8, 8), torch.rand(2, 2, 8, 8), y_channel=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(photos):
    hr = photos["chelsea"]
    sr = distorted(hr)
    assert psnr(sr.cuda(), hr.cuda(), y_channel=True).item() == pytest.approx(psnr(sr, hr, y_channel=True).item())
    assert ssim(sr.cuda(), hr.cuda()).item() == pytest.approx(ssim(sr, hr).item(), abs=1e-12)
