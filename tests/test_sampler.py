"""The device-resident patch sampler: exact crops, exact LR, seeded per rank and step."""

from __future__ import annotations

import pytest
import torch

from sr_tune.data.augment import Augmenter, dihedral
from sr_tune.data.degrade import imresize
from sr_tune.data.sampler import ImageBank, PatchSampler, step_uniforms, to_model_space
from sr_tune.data.sources import shard_for_rank, skimage_photo


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    # Different sizes and aspect ratios, so offsets and row strides matter.
    return [
        skimage_photo(n)[:, :h, :w].contiguous()
        for n, h, w in (("astronaut", 120, 97), ("coffee", 64, 200), ("rocket", 151, 151))
    ]


def sampler(bank: ImageBank, **overrides) -> PatchSampler:
    options = {"scale": 3, "lr_patch_size": 11, "batch_size": 8, "color": "rgb", "seed": 5} | overrides
    return PatchSampler(bank, **options)


def test_crops_are_the_exact_pixels_of_their_images(images):
    bank = ImageBank(images)
    s = sampler(bank, batch_size=64)
    index, top, left = s.draw(step=3)
    patches = bank.crop(index, top, left, size=33)
    assert patches.shape == (64, 3, 33, 33) and patches.dtype == torch.uint8
    assert len(set(index.tolist())) == 3  # every image is drawn from
    for k in range(64):
        image = images[int(index[k])]
        expected = image[:, int(top[k]) : int(top[k]) + 33, int(left[k]) : int(left[k]) + 33]
        assert torch.equal(patches[k], expected)


def test_flips_and_rotations_folded_into_the_gather_equal_the_dihedral_of_the_crop(images):
    bank = ImageBank(images)
    index, top, left = sampler(bank, batch_size=64).draw(step=3)
    choice = torch.arange(64) % 8  # every transform, on crops of every image
    turned = bank.crop(index, top, left, size=33, dihedral=choice)
    assert torch.equal(turned, dihedral(bank.crop(index, top, left, size=33), choice))
    assert not torch.equal(turned, bank.crop(index, top, left, size=33))


@pytest.mark.parametrize(("color", "luma"), [("y", False), ("y", True), ("rgb", False)])
def test_steps_drawn_together_give_each_step_what_it_draws_alone(images, color, luma):
    bank, turns = ImageBank(images, luma=luma), Augmenter(flip_rot=True)
    together = sampler(bank, color=color, augmenter=turns, quantize_lr=True)
    alone = sampler(bank, color=color, augmenter=turns, quantize_lr=True)
    alone.steps_at_once = 1
    assert together.steps_at_once == 8
    for step in (5, 3, 11, 12, 0, 7, 8):  # out of order, across runs of steps
        for mine, its in zip(together.batch(step), alone.batch(step)):
            assert torch.equal(mine, its) and mine.shape[0] == 8


def test_a_bank_of_y_gives_the_patches_of_the_rgb_bank():
    images = [skimage_photo(name) for name in ("astronaut", "coffee")]  # whole photos: odd sizes, real colours
    options = {"scale": 3, "lr_patch_size": 11, "batch_size": 16, "color": "y", "augmenter": Augmenter(flip_rot=True)}
    rgb, luma = PatchSampler(ImageBank(images), **options), PatchSampler(ImageBank(images, luma=True), **options)
    assert luma.bank.pixels.shape == (sum(im.shape[1] * im.shape[2] for im in images),)
    for step in (0, 9):
        for from_rgb, from_y in zip(rgb.batch(step), luma.batch(step)):
            torch.testing.assert_close(from_y, from_rgb, rtol=0, atol=2e-7)  # float rounding of the same formula
    # Each pixel's Y is what validation computes from the whole image.
    index, top, left = luma.draw(3)
    k = 5
    image = images[int(index[k])][None, :, int(top[k]) : int(top[k]) + 33, int(left[k]) : int(left[k]) + 33]
    torch.testing.assert_close(luma.bank.crop(index, top, left, size=33)[k : k + 1], to_model_space(image, "y"))
    with pytest.raises(ValueError, match="a bank of Y pixels serves Y training without warps"):
        PatchSampler(ImageBank(images, luma=True), **options | {"augmenter": Augmenter(strength=0.5)})
    with pytest.raises(ValueError, match="a bank of Y pixels serves Y training without warps"):
        PatchSampler(ImageBank(images, luma=True), **options | {"color": "rgb"})


def test_draws_depend_only_on_their_stream_step_and_place_and_are_uniform():
    together = step_uniforms(key=77, first=5, steps=6, count=40)
    assert together.shape == (6, 40) and together.dtype == torch.float64
    assert torch.equal(together[3], step_uniforms(key=77, first=8, steps=1, count=40)[0])
    assert not torch.equal(together[0], step_uniforms(key=78, first=5, steps=1, count=40)[0])
    many = step_uniforms(key=3, first=0, steps=1000, count=400).flatten()  # 400,000 draws
    assert 0.0 <= float(many.min()) and float(many.max()) < 1.0
    counts = torch.histc(many, bins=100, min=0, max=1)
    expected = len(many) / 100
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 160  # 99 degrees of freedom: p < 1e-4 above 160
    neighbours = torch.corrcoef(torch.stack([many[:-1], many[1:]]))[0, 1]
    assert abs(float(neighbours)) < 0.01  # consecutive counters do not give related draws


def test_crops_and_turns_cover_images_and_transforms_evenly(images):
    s = sampler(ImageBank(images), batch_size=4096, augmenter=Augmenter(flip_rot=True))
    index, _, _, turn = s._draw(first=2)
    assert torch.bincount(index, minlength=3).min() > 4096 / 3 * 0.9
    assert torch.bincount(turn, minlength=8).min() > 4096 / 8 * 0.85 and int(turn.max()) == 7


def test_patches_reach_every_edge_and_stay_inside(images):
    s = sampler(ImageBank(images), batch_size=4096)
    index, top, left = s.draw(step=0)
    heights = torch.tensor([im.shape[1] for im in images])[index]
    widths = torch.tensor([im.shape[2] for im in images])[index]
    assert (top >= 0).all() and (top + 33 <= heights).all() and (left + 33 <= widths).all()
    assert (top == 0).any() and (top + 33 == heights).any()


def test_lr_is_exactly_the_bicubic_downscale_of_hr(images):
    lr, hr = sampler(ImageBank(images), color="rgb").batch(step=1)
    assert hr.shape == (8, 3, 33, 33) and lr.shape == (8, 3, 11, 11)
    torch.testing.assert_close(lr, imresize(hr, scale=1 / 3), rtol=0, atol=0)
    lr_y, hr_y = sampler(ImageBank(images), color="y").batch(step=1)
    assert hr_y.shape == (8, 1, 33, 33) and 16 / 255 - 1e-6 <= float(hr_y.min())


def test_same_seed_rank_and_step_give_the_same_batch_in_any_order(images):
    bank = ImageBank(images)
    first = [sampler(bank).batch(step)[1] for step in (1, 2, 3)]
    resumed = sampler(bank).batch(3)[1]  # a run resumed at step 3 draws what step 3 drew
    assert torch.equal(first[2], resumed)
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(sampler(bank, rank=1).batch(1)[1], first[0])
    assert not torch.equal(sampler(bank, seed=6).batch(1)[1], first[0])


def test_ranks_hold_disjoint_shards_of_the_images():
    names = [f"img{i}" for i in range(7)]
    shards = [shard_for_rank(names, rank, 3) for rank in range(3)]
    assert shards == [["img0", "img3", "img6"], ["img1", "img4"], ["img2", "img5"]]
    with pytest.raises(ValueError, match="rank 3 is outside world size 3"):
        shard_for_rank(names, 3, 3)


def test_images_smaller_than_a_patch_are_refused(images):
    with pytest.raises(ValueError, match="2 image\\(s\\) are smaller than the 99px crop that a 99px HR patch needs"):
        sampler(ImageBank(images), lr_patch_size=33)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bank_gives_the_cpu_batch(images):
    cpu = sampler(ImageBank(images)).batch(4)
    cuda = sampler(ImageBank(images, "cuda")).batch(4)
    # The same pixels; the float conversion to Y may differ in the last bit (fused multiply-add on the GPU).
    torch.testing.assert_close(cuda[1].cpu(), cpu[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], rtol=1e-5, atol=1e-6)


def test_quantized_lr_patches_are_the_8_bit_rounding_of_the_bicubic_downscale(images):
    bank = ImageBank(images)
    for color in ("y", "rgb"):
        lr, hr = sampler(bank, color=color).batch(step=2)
        stored, same_hr = sampler(bank, color=color, quantize_lr=True).batch(step=2)
        assert torch.equal(same_hr, hr)
        assert torch.equal(stored, (lr.clamp(0, 1) * 255).round() / 255)
        assert not torch.equal(stored, lr)
