"""Validation pairs by the benchmark protocol, and per-rank shards of real image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from sr_tune.data.degrade import degrade, imresize, to_8bit
from sr_tune.data.sampler import to_model_space
from sr_tune.data.sources import SRImage, open_source, skimage_photo
from sr_tune.data.validation import validation_pairs
from sr_tune.metrics import psnr, rgb_to_ycbcr


def save(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture
def set5(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A Set5-style folder: one 101x86 HR photo and shipped LR for x2 only (made here, then brightened by
    one grey level so the test can tell shipped LR from LR made on the fly)."""
    hr = skimage_photo("chelsea")[:, 50:151, 100:186].contiguous()
    shipped = to_uint8(imresize(hr[None, :, :100, :86].double() / 255, scale=0.5)[0]).clamp(max=254) + 1
    save(hr, tmp_path / "Set5" / "HR" / "cat.png")
    save(shipped, tmp_path / "Set5" / "LR_bicubic" / "X2" / "catx2.png")
    return tmp_path / "Set5", hr, shipped


def test_whole_images_use_shipped_lr_and_modcrop_the_hr(set5):
    root, hr, shipped = set5
    (pair,) = validation_pairs(open_source(str(root), "val"), scale=2, color="rgb")
    assert pair.shipped_lr and pair.name == "cat"
    assert pair.hr.shape == (1, 3, 100, 86)  # 101 rows cut to a multiple of 2, from the top-left
    assert torch.equal(pair.hr[0], hr[:, :100, :86].float() / 255)
    assert torch.equal(pair.lr[0], shipped.float() / 255)


def test_without_shipped_lr_the_lr_is_the_bicubic_downscale(set5):
    root, hr, _ = set5
    (pair,) = validation_pairs(open_source(str(root), "val"), scale=3, color="y")
    assert not pair.shipped_lr and pair.hr.shape == (1, 1, 99, 84)
    torch.testing.assert_close(pair.hr, to_model_space(hr[None, :, :99, :84], "y"), rtol=0, atol=0)
    torch.testing.assert_close(pair.lr, degrade(pair.hr, 3), rtol=0, atol=0)


def test_centre_crops_keep_shipped_lr_and_hr_in_register(set5):
    root, hr, shipped = set5
    (pair,) = validation_pairs(open_source(str(root), "val"), scale=2, color="rgb", crop=41)
    # LR is 50x43; a 20x20 LR crop centred at rows 15..35, cols 11..31; HR is exactly twice that.
    assert pair.lr.shape == (1, 3, 20, 20) and pair.hr.shape == (1, 3, 40, 40)
    assert torch.equal(pair.lr[0], shipped[:, 15:35, 11:31].float() / 255)
    assert torch.equal(pair.hr[0], hr[:, 30:70, 22:62].float() / 255)


def test_ranks_decode_disjoint_shards_of_a_folder(tmp_path: Path):
    for k, name in enumerate(("astronaut", "coffee", "rocket", "chelsea", "camera")):
        save(skimage_photo(name)[:, : 40 + k, :50], tmp_path / "train" / f"img{k}.png")
    shards = [open_source(str(tmp_path / "train"), "train", rank=r, world_size=2) for r in range(2)]
    assert [[i.name for i in shard] for shard in shards] == [["img0", "img2", "img4"], ["img1", "img3"]]
    heights = sorted(i.hr.shape[1] for shard in shards for i in shard)
    assert heights == [40, 41, 42, 43, 44]  # every image once, decoded by exactly one rank
    sample = [[i.name for i in open_source("sample", "train", rank=r, world_size=3)] for r in range(3)]
    assert sorted(sum(sample, [])) == sorted(i.name for i in open_source("sample", "train"))
    assert not set(sample[0]) & set(sample[1])
    with pytest.raises(ValueError, match="holds no images for rank 5 of 6"):
        open_source(str(tmp_path / "train"), "train", rank=5, world_size=6)


def test_quantized_lr_holds_8_bit_levels_and_y_pairs_carry_the_lr_chroma(set5):
    root, hr, _ = set5
    (plain,) = validation_pairs(open_source(str(root), "val"), scale=3, color="y")
    (stored,) = validation_pairs(open_source(str(root), "val"), scale=3, color="y", quantize_lr=True)
    levels = stored.lr * 255
    assert torch.equal(levels, levels.round()) and not torch.equal(plain.lr * 255, (plain.lr * 255).round())
    assert (stored.lr - plain.lr).abs().max() <= 0.5 / 255 + 1e-7 and torch.equal(stored.hr, plain.hr)
    # The LR's CbCr, made like its Y: what the colour previews put beside the model's Y.
    rgb_lr = degrade(hr[None, :, :99, :84].float() / 255, 3)
    torch.testing.assert_close(stored.chroma, rgb_to_ycbcr(rgb_lr)[:, 1:])
    (rgb,) = validation_pairs(open_source(str(root), "val"), scale=3, color="rgb")
    assert rgb.chroma is None


def test_8_bit_protocol_lowers_the_bicubic_psnr_of_a_photograph_by_a_pinned_amount():
    """Published Set5/Set14 bicubic numbers are for 8-bit LR and outputs; measured here on scikit-image's coffee."""
    image = skimage_photo("coffee")
    results = {}
    for eight_bit in (False, True):
        (pair,) = validation_pairs([SRImage("coffee", image)], scale=3, color="y", quantize_lr=eight_bit)
        bicubic = imresize(pair.lr, scale=3).clamp(0, 1)
        bicubic = to_8bit(bicubic) if eight_bit else bicubic
        results[eight_bit] = psnr(bicubic, pair.hr, crop_border=3, y_channel=True).item()
    assert results[False] == pytest.approx(28.4091, abs=1e-4)
    assert results[True] - results[False] == pytest.approx(-0.0057, abs=1e-4)
