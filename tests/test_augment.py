"""Augmentation: coordinate conventions, the strength knob, no sampling outside the image, consistent pairs."""

from __future__ import annotations

import math

import pytest
import torch

from sr_tune.data.augment import Augmenter, dihedral, homography_from_corners, jitter_colors, warp
from sr_tune.data.degrade import imresize
from sr_tune.data.sampler import ImageBank, PatchSampler, step_generator, to_model_space
from sr_tune.data.sources import skimage_photo


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    return [skimage_photo(name)[:, :200, :230].contiguous() for name in ("astronaut", "coffee", "rocket")]


def sampler(bank: ImageBank, augmenter: Augmenter, **overrides) -> PatchSampler:
    options = {"scale": 3, "lr_patch_size": 11, "batch_size": 64, "color": "rgb", "seed": 9} | overrides
    return PatchSampler(bank, augmenter=augmenter, **options)


def source_corners(matrices: torch.Tensor) -> torch.Tensor:
    """Where the patch corners (+-1, +-1) are read from: (B, 4, 2) in half-patch units."""
    corners = torch.tensor(
        [[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=matrices.dtype
    )
    mapped = corners @ matrices.transpose(1, 2)
    return mapped[..., :2] / mapped[..., 2:]


def test_identity_warp_is_the_centre_crop_and_a_quarter_turn_is_a_rotation(images):
    crop = images[0][None, :, :41, :41].float() / 255  # (1, 3, 41, 41): patch 33 centred, 4 pixels each side
    centre = crop[..., 4:37, 4:37]
    identity = torch.eye(3, dtype=torch.float64)[None]
    torch.testing.assert_close(warp(crop, identity, 33), centre, rtol=0, atol=1e-6)
    # Output (x, y) reads source (-y, x): out[i, j] = centre[j, P-1-i].
    quarter = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(warp(crop, quarter, 33), centre.transpose(-1, -2).flip(-2), rtol=0, atol=1e-6)


def test_homography_takes_the_corners_where_asked():
    target = torch.tensor([[[-1.1, -0.9], [0.95, -1.05], [1.08, 1.02], [-0.93, 0.97]]], dtype=torch.float64)
    torch.testing.assert_close(source_corners(homography_from_corners(target)), target)


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_drawn_warps_stay_within_their_reach_and_use_most_of_it(strength):
    augmenter = Augmenter(strength=strength)
    reach = augmenter.reach()
    far = source_corners(augmenter.warp_matrices(20000, torch.Generator().manual_seed(1))).abs().amax()
    assert 1.0 < float(far) <= reach
    assert float(far) > 1 + 0.7 * (reach - 1)  # the crop margin is not mostly wasted


def test_strength_scales_every_range():
    assert Augmenter(strength=0.0).reach() == 1.0
    reaches = [Augmenter(strength=s).reach() for s in (0.0, 0.25, 0.5, 1.0)]
    assert reaches == sorted(reaches) and len(set(reaches)) == 4
    sizes = [Augmenter(strength=s).crop_size(33) for s in (0.0, 0.5, 1.0)]
    assert sizes[0] == 33 and sizes[0] < sizes[1] < sizes[2] and all(size % 2 == 1 for size in sizes)
    with pytest.raises(ValueError, match="strength 1.5 is outside"):
        Augmenter(strength=1.5)


def test_strength_zero_gives_the_exact_pixels_and_exact_bicubic_lr(images):
    bank = ImageBank(images)
    plain = sampler(bank, Augmenter(strength=0.0, flip_rot=False))
    assert plain.crop_size == 33
    lr, hr = plain.batch(step=4)
    crops = bank.crop(*plain.draw(step=4), size=33)
    assert torch.equal(hr, to_model_space(crops, "rgb"))  # not warped, not interpolated
    torch.testing.assert_close(lr, imresize(hr, scale=1 / 3), rtol=0, atol=0)

    # Flips and rot90 alone keep the pixels exact: each patch is one of the 8 transforms of its crop.
    lr, hr = sampler(bank, Augmenter(strength=0.0, flip_rot=True), batch_size=256).batch(step=4)
    crops = to_model_space(bank.crop(*sampler(bank, Augmenter(), batch_size=256).draw(step=4), size=33), "rgb")
    seen = set()
    for k in range(256):
        matches = [c for c in range(8) if torch.equal(hr[k], dihedral(crops[k : k + 1], torch.tensor([c]))[0])]
        assert matches, f"patch {k} is not a flip/rotation of its crop"
        seen.add(matches[0])
    assert seen == set(range(8))
    torch.testing.assert_close(lr, imresize(hr, scale=1 / 3), rtol=0, atol=0)


@pytest.mark.parametrize("lr_patch_size", [8, 11, 32])
def test_warps_never_sample_outside_the_image(lr_patch_size):
    augmenter = Augmenter(strength=1.0)
    side = augmenter.crop_size(lr_patch_size * 2)
    # One constant image exactly as large as the crop: any read outside it would blend in zeros.
    bank = ImageBank([torch.full((3, side, side), 200, dtype=torch.uint8)])
    s = sampler(bank, augmenter, scale=2, lr_patch_size=lr_patch_size, batch_size=512)
    for step in range(4):
        _, hr = s.batch(step)
        torch.testing.assert_close(hr, torch.full_like(hr, 200 / 255), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=f"smaller than the {side}px crop .* at augmentation strength 1.0"):
        PatchSampler(
            ImageBank([torch.zeros(3, side - 1, 500, dtype=torch.uint8)]),
            scale=2,
            lr_patch_size=lr_patch_size,
            batch_size=1,
            color="y",
            augmenter=augmenter,
        )


def test_augmented_pairs_are_consistent_and_repeatable(images):
    augmenter = Augmenter(strength=1.0, color_jitter=True)
    bank = ImageBank(images)
    lr, hr = sampler(bank, augmenter, color="y").batch(step=7)
    assert hr.shape == (64, 1, 33, 33) and lr.shape == (64, 1, 11, 11)
    torch.testing.assert_close(lr, imresize(hr, scale=1 / 3), rtol=0, atol=0)  # LR made from the warped HR
    again_lr, again_hr = sampler(bank, augmenter, color="y").batch(step=7)
    assert torch.equal(hr, again_hr) and torch.equal(lr, again_lr)
    plain = to_model_space(bank.crop(*sampler(bank, Augmenter(strength=0.0)).draw(step=7), size=33), "y")
    assert not torch.allclose(hr, plain)


def test_colour_jitter_factors():
    rgb = skimage_photo("coffee")[None, :, :48, :48].float() / 255
    ones = torch.ones(1)
    torch.testing.assert_close(jitter_colors(rgb, ones, ones, ones), rgb)
    grey = jitter_colors(rgb, ones, ones, torch.zeros(1))  # saturation 0: every channel the same grey
    torch.testing.assert_close(grey[:, 0], grey[:, 2])
    darker = jitter_colors(rgb, torch.tensor([0.5]), ones, ones)
    torch.testing.assert_close(darker, rgb * 0.5)
    flat = jitter_colors(rgb, ones, torch.zeros(1), ones)  # contrast 0: the patch's mean grey everywhere
    mean_grey = (rgb * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1).mean()
    assert float(flat.std()) < 1e-6 and math.isclose(float(flat.mean()), float(mean_grey), rel_tol=1e-5)


def test_augmentation_draws_come_from_the_step_generator():
    augmenter = Augmenter(strength=0.7)
    first = augmenter.warp_matrices(4, step_generator(3, 0, 10))
    assert torch.equal(first, augmenter.warp_matrices(4, step_generator(3, 0, 10)))
    assert not torch.equal(first, augmenter.warp_matrices(4, step_generator(3, 1, 10)))  # another rank


def test_per_sample_strengths_scale_each_samples_warp_from_the_same_draws(images):
    augmenter = Augmenter(strength=0.6, color_jitter=True)
    bank = ImageBank(images)
    warped = sampler(bank, augmenter, color="rgb")
    lr, hr = warped.batch(step=3)
    # The augmenter's own strength for every sample: the same batch, draw for draw.
    same_lr, same_hr = warped.batch(step=3, strengths=torch.full((64,), 0.6, dtype=torch.float64))
    assert torch.equal(hr, same_hr) and torch.equal(lr, same_lr)
    # Strength 0 for the first half: their patches are the plain crops; the rest are warped as before.
    strengths = torch.cat([torch.zeros(32, dtype=torch.float64), torch.full((32,), 0.6, dtype=torch.float64)])
    _, mixed = warped.batch(step=3, strengths=strengths)
    generator = step_generator(9, 0, 3)  # the sampler's seed, rank 0, the step
    matrices = augmenter.warp_matrices(64, generator, strengths)
    flips = torch.randint(8, (64,), generator=generator)  # drawn right after the warps' draws
    plain = to_model_space(bank.crop(*warped.draw(step=3), size=warped.crop_size), "rgb")
    margin = (warped.crop_size - 33) // 2
    centre = dihedral(plain[:, :, margin : margin + 33, margin : margin + 33], flips)
    torch.testing.assert_close(mixed[:32], centre[:32], rtol=0, atol=1e-5)
    assert torch.equal(mixed[32:], hr[32:])
    torch.testing.assert_close(matrices[:32], torch.eye(3, dtype=torch.float64).expand(32, 3, 3))
    with pytest.raises(ValueError, match=r"must be 64 values in \[0, 0.6\]"):
        warped.batch(step=3, strengths=torch.full((64,), 0.7, dtype=torch.float64))
