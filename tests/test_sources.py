"""Image sources on real files: folders in every format, DIV2K and benchmark layouts, Parquet shards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr_tune.cli import main
from sr_tune.data import sources
from sr_tune.data.sources import (
    ALPHA_DROPPED,
    MANIFEST,
    BadImageError,
    iter_folder,
    open_source,
    read_benchmark,
    read_div2k,
    read_shards,
    skimage_photo,
)


def save(image: torch.Tensor, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, **options)
    return path


def pil_pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def crops() -> list[torch.Tensor]:
    """Real photographs, cropped small so tests stay fast: uint8 (3, H, W) with odd sizes."""
    return [skimage_photo(name)[:, 40:141, 60:183].contiguous() for name in ("astronaut", "coffee", "rocket")]


@pytest.fixture
def mixed_folder(tmp_path: Path, crops) -> Path:
    root = tmp_path / "images"
    save(crops[0], root / "b.png")
    save(crops[1], root / "a.jpg", quality=90)
    save(crops[2], root / "nested" / "c.bmp")
    save(crops[0], root / "nested" / "deeper" / "d.tiff")
    save(crops[1], root / "e.webp", lossless=True)
    grey = Image.fromarray(crops[2][0].numpy())  # mode L
    grey.save(root / "f_grey.png")
    (root / "notes.txt").write_text("not an image, and not listed")
    return root


def test_folder_reads_every_format_in_sorted_order(mixed_folder: Path, crops):
    images = list(iter_folder(mixed_folder))
    assert [i.name for i in images] == ["a", "b", "e", "f_grey", "nested/c", "nested/deeper/d"]
    by_name = {i.name: i.hr for i in images}
    assert all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in by_name.values())
    assert torch.equal(by_name["b"], crops[0])  # lossless formats give back the exact pixels
    assert torch.equal(by_name["nested/c"], crops[2])
    assert torch.equal(by_name["nested/deeper/d"], crops[0])
    assert torch.equal(by_name["e"], crops[1])
    assert torch.equal(by_name["a"], pil_pixels(mixed_folder / "a.jpg"))  # JPEG: what the decoder gives
    grey = by_name["f_grey"]
    assert torch.equal(grey[0], crops[2][0]) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_a_truncated_file_is_named(mixed_folder: Path):
    png = mixed_folder / "b.png"
    png.write_bytes(png.read_bytes()[:2000])
    with pytest.raises(BadImageError, match=r"b\.png: cannot decode image"):
        list(iter_folder(mixed_folder))


def test_a_non_image_with_an_image_suffix_is_named(mixed_folder: Path):
    (mixed_folder / "z_fake.png").write_text("hello")
    with pytest.raises(BadImageError, match=r"z_fake\.png: cannot decode image") as error:
        open_source(str(mixed_folder), "train")
    assert "BytesIO" not in str(error.value)


def test_transparency_is_dropped_with_a_warning_naming_the_file(tmp_path: Path, crops, caplog):
    rgba = np.concatenate([crops[0].permute(1, 2, 0).numpy(), np.full((*crops[0].shape[1:], 1), 255, np.uint8)], 2)
    Image.fromarray(rgba).save(tmp_path / "opaque.png")
    rgba[:10, :10, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "holes.png")
    with caplog.at_level(logging.WARNING, logger="sr_tune.data.sources"):
        images = {image.name: image.hr for image in iter_folder(tmp_path)}
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'holes.png'}: {ALPHA_DROPPED}"]
    assert torch.equal(images["holes"], crops[0]) and torch.equal(images["opaque"], crops[0])


def test_sixteen_bit_images_are_refused_by_name(tmp_path: Path):
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(BadImageError, match=r"deep\.png: I;16 images are not supported \(8-bit images only\)"):
        list(iter_folder(tmp_path))


def test_a_decompression_bomb_is_a_bad_image_named_and_skippable(mixed_folder: Path, caplog):
    # 14000 x 14000 pixels (196 M, over twice Pillow's limit) in a few kilobytes of PNG.
    Image.new("1", (14000, 14000)).save(mixed_folder / "z_bomb.png")
    assert (mixed_folder / "z_bomb.png").stat().st_size < 100_000
    with pytest.raises(BadImageError, match=r"z_bomb\.png: refused as a possible decompression bomb"):
        list(iter_folder(mixed_folder))
    with caplog.at_level(logging.WARNING, logger="sr_tune.data.sources"):
        images = list(iter_folder(mixed_folder, skip_bad=True))
    assert "z_bomb" not in [i.name for i in images] and caplog.records[-1].getMessage().endswith(
        "skipped 1 bad image(s)"
    )


def test_skip_bad_warns_per_file_and_counts(mixed_folder: Path, caplog):
    (mixed_folder / "z_fake.png").write_text("hello")
    png = mixed_folder / "b.png"
    png.write_bytes(png.read_bytes()[:2000])
    with caplog.at_level(logging.WARNING, logger="sr_tune.data.sources"):
        images = list(iter_folder(mixed_folder, skip_bad=True))
    assert [i.name for i in images] == ["a", "e", "f_grey", "nested/c", "nested/deeper/d"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("b.png" in m for m in messages) and any("z_fake.png" in m for m in messages)
    assert messages[-1].endswith("skipped 2 bad image(s)")


def test_div2k_layout_with_paired_lr(tmp_path: Path, crops):
    root = tmp_path / "DIV2K"
    for index, crop in enumerate(crops[:2], start=1):
        hr = crop[:, :100, :120]
        save(hr, root / "DIV2K_train_HR" / f"{index:04d}.png")
        save(hr[:, ::2, ::2].contiguous(), root / "DIV2K_train_LR_bicubic" / "X2" / f"{index:04d}x2.png")
    save(crops[2][:, :99, :99].contiguous(), root / "DIV2K_valid_HR" / "0801.png")
    train = read_div2k(root, "train")
    assert [i.name for i in train] == ["0001", "0002"]
    assert sorted(train[0].lr) == [2] and train[0].lr[2].shape == (3, 50, 60)
    assert torch.equal(train[1].lr[2], crops[1][:, :100:2, :120:2])
    valid = open_source(str(root), "val")
    assert [i.name for i in valid] == ["0801"] and valid[0].lr == {}


def test_lr_of_the_wrong_size_is_named(tmp_path: Path, crops):
    root = tmp_path / "Set5"
    save(crops[0][:, :100, :120].contiguous(), root / "HR" / "baby.png")
    save(crops[0][:, :40, :40].contiguous(), root / "LR_bicubic" / "X3" / "babyx3.png")
    with pytest.raises(BadImageError, match=r"babyx3\.png: LR is 40x40, expected 33x40 for HR .*baby\.png at x3"):
        read_benchmark(root)


def test_benchmark_layout_accepts_both_lr_namings(tmp_path: Path, crops):
    root = tmp_path / "Set14"
    hr = crops[0][:, :96, :120].contiguous()
    save(hr, root / "HR" / "baboon.png")
    save(hr[:, ::2, ::2].contiguous(), root / "LR_bicubic" / "X2" / "baboonx2.png")
    save(hr[:, ::4, ::4].contiguous(), root / "LR_bicubic" / "X4" / "baboon.png")
    (image,) = open_source(str(root), "val")
    assert image.name == "baboon" and sorted(image.lr) == [2, 4]
    assert image.lr[4].shape == (3, 24, 30)


def test_prepare_round_trips_bit_exactly_through_several_shards(mixed_folder: Path, tmp_path: Path):
    dest = tmp_path / "shards"
    assert main(["prepare", str(mixed_folder), str(dest), "--shard-mb", "0.02"]) == 0
    manifest = json.loads((dest / MANIFEST).read_text())
    assert manifest["images"] == 6 and len(manifest["shards"]) >= 3
    original = list(iter_folder(mixed_folder))
    for spec in (str(dest), dest.resolve().as_uri()):  # a local path and a pyarrow.fs file:// URI
        restored = read_shards(spec)
        assert [i.name for i in restored] == [i.name for i in original]
        assert all(torch.equal(a.hr, b.hr) for a, b in zip(original, restored))
    assert [i.name for i in open_source(str(dest), "train")] == [i.name for i in original]


def test_ranks_get_disjoint_shards_that_cover_everything(mixed_folder: Path, tmp_path: Path):
    dest = tmp_path / "shards"
    main(["prepare", str(mixed_folder), str(dest), "--shard-mb", "0.02"])
    parts = [[i.name for i in read_shards(str(dest), rank=r, world_size=2)] for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(i.name for i in iter_folder(mixed_folder))
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_a_changed_shard_is_caught_by_its_checksum(mixed_folder: Path, tmp_path: Path):
    dest = tmp_path / "shards"
    main(["prepare", str(mixed_folder), str(dest)])
    shard = dest / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(BadImageError, match="shard-00000.parquet: checksum mismatch"):
        read_shards(str(dest))


def test_prepare_of_a_corrupt_folder_fails_naming_the_file(mixed_folder: Path, tmp_path: Path, capsys):
    (mixed_folder / "z_fake.png").write_text("hello")
    assert main(["prepare", str(mixed_folder), str(tmp_path / "out")]) == 2
    assert "z_fake.png: cannot decode image" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written left behind
    # Into a folder that was there: it stays, the shards written before the bad image do not.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    assert main(["prepare", str(mixed_folder), str(tmp_path / "kept"), "--shard-mb", "0.001"]) == 2
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes.txt"]


def test_sample_set_is_real_photographs_with_a_fixed_split():
    train, val = open_source("sample", "train"), open_source("sample", "val")
    assert [i.name for i in val] == ["astronaut", "coffee", "chelsea", "rocket"]
    assert len(train) == 12 and not {i.name for i in train} & {i.name for i in val}
    assert all(i.hr.dtype == torch.uint8 and i.hr.shape[0] == 3 and min(i.hr.shape[1:]) >= 190 for i in train)


def test_a_source_read_again_in_the_process_is_not_decoded_again_unless_its_files_changed(tmp_path: Path, crops):
    folder = tmp_path / "photos"
    save(crops[0], folder / "a.png")
    save(crops[1], folder / "b.png")
    first = open_source(str(folder), "train")
    again = open_source(str(folder), "train")
    assert [a.hr is b.hr for a, b in zip(first, again)] == [True, True]  # the decoded tensors themselves
    assert open_source(str(folder), "train", rank=1, world_size=2)[0].hr is not first[1].hr  # another read
    assert open_source(str(folder), "val")[0].hr is not first[0].hr  # each split keeps its own

    save(crops[2], folder / "b.png")  # replaced: other pixels, another size
    changed = open_source(str(folder), "train")
    assert torch.equal(changed[1].hr, crops[2]) and changed[0].hr is not first[0].hr
    (folder / "b.png").unlink()
    assert [image.name for image in open_source(str(folder), "train")] == ["a"]


def test_a_source_over_the_cache_limit_is_decoded_each_time(tmp_path: Path, crops, monkeypatch):
    monkeypatch.setattr(sources, "DECODED_CACHE_BYTES", crops[0].nbytes)  # room for one of the two images
    save(crops[0], tmp_path / "a.png")
    save(crops[1], tmp_path / "b.png")
    first, again = open_source(str(tmp_path), "train"), open_source(str(tmp_path), "train")
    assert torch.equal(first[0].hr, again[0].hr) and first[0].hr is not again[0].hr
