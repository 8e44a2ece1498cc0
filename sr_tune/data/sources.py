"""Image sources: folders, DIV2K and benchmark layouts, Parquet shards, and the built-in ``sample`` set.

Every source yields ``SRImage`` records: a name, the HR image as uint8 (3, H, W) and, where the source
ships them, paired LR images per scale. Grey images are repeated to three channels, so colour conversion
(RGB or Y) happens in one place downstream. A file that cannot be decoded raises ``BadImageError`` naming it,
or, with ``skip_bad=True``, logs a warning naming it and a count at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from sr_tune.credentials import credential_problem
from sr_tune.errors import InputError
from sr_tune.models import SUPPORTED_SCALES
from sr_tune.storage import Storage, filesystem_and_path, probe

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
ALPHA_DROPPED = "has transparent pixels; its alpha channel is dropped (the colours under it are used)"
# PIL modes that hold 8-bit samples; 16-bit and float modes (I;16, I, F) are refused.
_EIGHT_BIT_MODES = {
    "L": "RGB",
    "LA": "RGB",
    "P": "RGB",
    "PA": "RGB",
    "RGB": "RGB",
    "RGBA": "RGB",
    "CMYK": "RGB",
    "YCbCr": "RGB",
    "1": "RGB",
}

# Fixed split of the built-in sample set. ``chelsea`` and ``cat`` are the same photograph: only one is used.
SAMPLE_TRAIN = (
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
    "page",
    "clock",
)
SAMPLE_VAL = ("astronaut", "coffee", "chelsea", "rocket")

MANIFEST = "manifest.json"
PARQUET_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int8()),
        ("png", pa.binary()),
    ]
)


# Pillow refuses images over twice its MAX_IMAGE_PIXELS (179 MP) and only warns from 89 MP; sr_tune refuses
# from here, before a pixel is decoded: a 17 KB PNG can declare 144 MP (432 MB as RGB, 16 GB upscaled x4).
MAX_INPUT_PIXELS = 80_000_000


class BadImageError(ValueError):
    """An image file that is missing, truncated, corrupt, not an image, or not 8-bit."""


@dataclass(frozen=True)
class SRImage:
    name: str
    hr: torch.Tensor  # uint8 (3, H, W)
    lr: dict[int, torch.Tensor] = field(default_factory=dict)  # scale -> uint8 (3, H/s, W/s), when shipped


def decode_image(data: bytes, name: str, *, max_pixels: int = MAX_INPUT_PIXELS) -> torch.Tensor:
    """Decode 8-bit image bytes of at most ``max_pixels`` pixels to uint8 RGB (3, H, W); errors name ``name``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
            image.load()  # decodes fully, so a truncated file fails here rather than later
            if image.mode not in _EIGHT_BIT_MODES:
                raise BadImageError(f"{name}: {image.mode} images are not supported (8-bit images only)")
            if "A" in image.getbands() and image.getchannel("A").getextrema()[0] < 255:
                log.warning("%s: %s", name, ALPHA_DROPPED)
            array = np.asarray(image.convert(_EIGHT_BIT_MODES[image.mode]))
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadImageError(_image_error(name, error)) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _image_error(name: str, error: BaseException) -> str:
    """Pillow's (or the file system's) error on image ``name`` as one line."""
    if isinstance(error, UnidentifiedImageError):
        return f"{name}: cannot decode image (not a format Pillow reads, or not an image)"
    if isinstance(error, Image.DecompressionBombError):  # a few KB that decode to gigabytes
        return f"{name}: refused as a possible decompression bomb ({error})"
    if isinstance(error, OSError) and error.strerror:
        return f"{name}: cannot read ({error.strerror})"
    return f"{name}: cannot decode image ({error})"


def image_file_problem(path: Path, *, max_pixels: int = MAX_INPUT_PIXELS) -> str | None:
    """Why image file ``path`` would fail to decode (None when it would not), found before its pixels are
    needed: unreadable, not an image, not 8-bit, more than ``max_pixels`` pixels (from the header alone), or
    truncated or corrupt (PNG: chunks and checksums verified; JPEG: decoded at 1/8 scale; others decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is judged below
            image = Image.open(path)
        with image:
            width, height = image.size
            if image.mode not in _EIGHT_BIT_MODES:
                return f"{path}: {image.mode} images are not supported (8-bit images only)"
            if width * height > max_pixels:
                return (
                    f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
                    f"{max_pixels / 1e6:.0f} allowed (a possible decompression bomb)"
                )
            if image.format == "PNG":
                image.verify()  # every chunk's checksum, and the end chunk: a truncated file fails
            elif image.format == "JPEG":
                # Decoded at 1/8 scale (the DCT's own scaling): every scan is read, so a truncated file fails,
                # in a fraction of a full decode; data after the image is fine.
                image.draft(image.mode, (max(width // 8, 1), max(height // 8, 1)))
                image.load()
            else:
                image.load()  # formats without a cheap structural check are decoded once
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return _image_error(str(path), error)
    return None


def read_image(path: Path, *, max_pixels: int = MAX_INPUT_PIXELS) -> torch.Tensor:
    """Read one image file of at most ``max_pixels`` pixels to uint8 RGB (3, H, W)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadImageError(f"{path}: cannot read ({error.strerror})") from None
    return decode_image(data, str(path), max_pixels=max_pixels)


def shard_for_rank(items: Sequence, rank: int, world_size: int) -> list:
    """Every ``world_size``-th item starting at ``rank``: disjoint shards that cover everything."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return list(items[rank::world_size])


def list_image_files(folder: Path) -> list[Path]:
    """Every image file below ``folder`` (recursively), sorted by relative path: a stable order."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


class _BadImageTally:
    """Raise on the first bad image, or with ``skip_bad`` warn per image and count them at the end."""

    def __init__(self, skip_bad: bool, source: str) -> None:
        self.skip_bad, self.source, self.skipped = skip_bad, source, 0

    def read(self, load: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        try:
            return load()
        except BadImageError as error:
            if not self.skip_bad:
                raise
            log.warning("skipping bad image: %s", error)
            self.skipped += 1
            return None

    def finish(self) -> None:
        if self.skipped:
            log.warning("%s: skipped %d bad image(s)", self.source, self.skipped)


def large_enough(images: list[SRImage], side: int, *, why: str, skip_bad: bool, source: str) -> list[SRImage]:
    """The images with both sides at least ``side`` pixels (``why``: what needs that size). Smaller ones are
    bad images: one ``BadImageError`` naming each of them, or with ``skip_bad`` a warning per image."""
    small = [image for image in images if min(image.hr.shape[-2:]) < side]
    sizes = [f"{image.name} ({image.hr.shape[-1]}x{image.hr.shape[-2]})" for image in small]
    if small and not skip_bad:
        raise BadImageError(
            f"{source}: {len(small)} image(s) smaller than {why}: {', '.join(sizes)} (set data.skip_bad: true "
            f"to skip them, or lower data.lr_patch_size)"
        )
    for size in sizes:
        log.warning("skipping bad image: %s is smaller than %s", size, why)
    kept = [image for image in images if min(image.hr.shape[-2:]) >= side]
    if not kept:
        raise BadImageError(f"{source}: no image is at least {side}x{side} pixels, the size of {why}")
    if small:
        log.warning("%s: skipped %d image(s) smaller than %s", source, len(small), why)
    return kept


def iter_folder(folder: Path, *, skip_bad: bool = False, rank: int = 0, world_size: int = 1) -> Iterator[SRImage]:
    """Every image below ``folder`` (this rank's shard), one at a time (names: relative paths, no suffix)."""
    tally = _BadImageTally(skip_bad, str(folder))
    for path in shard_for_rank(list_image_files(folder), rank, world_size):
        hr = tally.read(lambda: read_image(path))
        if hr is not None:
            yield SRImage(name=path.relative_to(folder).with_suffix("").as_posix(), hr=hr)
    tally.finish()


def _paired_lr(lr_root: Path, name: str, scale: int) -> Path | None:
    """LR file of HR ``name`` in ``lr_root/X{scale}``: ``{name}x{scale}.png`` (DIV2K) or ``{name}.png``."""
    folder = lr_root / f"X{scale}"
    for stem in (f"{name}x{scale}", name):
        for suffix in sorted(IMAGE_SUFFIXES):
            if (candidate := folder / f"{stem}{suffix}").is_file():
                return candidate
    return None


def read_paired(
    hr_folder: Path, lr_root: Path | None, *, skip_bad: bool = False, rank: int = 0, world_size: int = 1
) -> list[SRImage]:
    """HR images (this rank's shard) and, where ``lr_root/X{2,3,4}`` hold them, their LR partners (sizes checked)."""
    tally = _BadImageTally(skip_bad, str(hr_folder))
    images = []
    for path in shard_for_rank(list_image_files(hr_folder), rank, world_size):
        hr = tally.read(lambda: read_image(path))
        if hr is None:
            continue
        name = path.relative_to(hr_folder).with_suffix("").as_posix()
        lr: dict[int, torch.Tensor] = {}
        for scale in SUPPORTED_SCALES:
            lr_path = _paired_lr(lr_root, name, scale) if lr_root is not None else None
            if lr_path is None:
                continue
            lr_image = tally.read(lambda: read_image(lr_path))
            if lr_image is None:
                continue
            expected = (hr.shape[1] // scale, hr.shape[2] // scale)
            if tuple(lr_image.shape[1:]) != expected:
                raise BadImageError(
                    f"{lr_path}: LR is {lr_image.shape[1]}x{lr_image.shape[2]}, expected {expected[0]}x{expected[1]} "
                    f"for HR {path} at x{scale}"
                )
            lr[scale] = lr_image
        images.append(SRImage(name=name, hr=hr, lr=lr))
    tally.finish()
    return images


def read_div2k(root: Path, split: str, **options) -> list[SRImage]:
    """DIV2K: ``DIV2K_{train,valid}_HR/`` and optional ``DIV2K_{train,valid}_LR_bicubic/X{s}/NNNNx{s}.png``.

    ``options``: ``skip_bad``, ``rank`` and ``world_size`` of ``read_paired``.
    """
    part = "train" if split == "train" else "valid"
    lr_root = root / f"DIV2K_{part}_LR_bicubic"
    return read_paired(root / f"DIV2K_{part}_HR", lr_root if lr_root.is_dir() else None, **options)


def read_benchmark(root: Path, **options) -> list[SRImage]:
    """Set5 / Set14 / BSD100 / Urban100 / Manga109 style: ``HR/`` and optional ``LR_bicubic/X{s}/``."""
    lr_root = root / "LR_bicubic"
    return read_paired(root / "HR", lr_root if lr_root.is_dir() else None, **options)


# --- Parquet shards -------------------------------------------------------------------------------------


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 (3, H, W) -> PNG bytes (lossless, so decoding gives back the same pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(
    images: Iterable[SRImage], dest: str, *, shard_bytes: int = 256 * 2**20, source: str = ""
) -> dict[str, object]:
    """Write images as Parquet shards of about ``shard_bytes`` plus ``manifest.json`` (counts, SHA-256).

    ``dest`` must be new or empty (``FileExistsError`` before anything is written). Shards are written first
    and the manifest last, so a reader never sees a manifest whose shards are missing; when writing fails (a
    bad image), the shards written so far are removed, and the destination too when this call created it.
    Returns the manifest.
    """
    fs, root = filesystem_and_path(dest)
    created = fs.get_file_info(root).type == pafs.FileType.NotFound
    if not created:
        held = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if fs.get_file_info(root).type != pafs.FileType.Directory or held:
            raise FileExistsError(
                f"{dest} is not empty ({len(held)} file(s) and folder(s)): prepare writes a data set only into a new "
                f"or empty destination, so that one already there is never replaced or left half overwritten"
            )
    fs.create_dir(root, recursive=True)
    written: list[str] = []
    try:
        return _write_shards(images, fs, root, shard_bytes, source, written)
    except BaseException:
        for path in written:
            fs.delete_file(path)
        if created:
            fs.delete_dir(root)
        raise


def _write_shards(
    images: Iterable[SRImage], fs: pafs.FileSystem, root: str, shard_bytes: int, source: str, written: list[str]
) -> dict[str, object]:
    shards: list[dict[str, object]] = []
    rows: list[dict[str, object]] = []
    pending = 0

    def flush() -> None:
        nonlocal rows, pending
        if not rows:
            return
        name = f"shard-{len(shards):05d}.parquet"
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), buffer, compression="none")
        payload = buffer.getvalue()
        with fs.open_output_stream(f"{root}/{name}") as stream:
            written.append(f"{root}/{name}")
            stream.write(payload)
        shards.append(
            {"file": name, "images": len(rows), "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        )
        rows, pending = [], 0

    for image in images:
        png = encode_png(image.hr)
        rows.append(
            {
                "name": image.name,
                "height": image.hr.shape[1],
                "width": image.hr.shape[2],
                "channels": image.hr.shape[0],
                "png": png,
            }
        )
        pending += len(png)
        if pending >= shard_bytes:
            flush()
    flush()
    manifest = {"format": 1, "source": source, "images": sum(int(s["images"]) for s in shards), "shards": shards}
    with fs.open_output_stream(f"{root}/{MANIFEST}") as stream:
        stream.write(json.dumps(manifest, indent=2).encode())
    return manifest


def read_shards(uri: str, *, skip_bad: bool = False, rank: int = 0, world_size: int = 1) -> list[SRImage]:
    """Images from Parquet shards written by ``write_shards``; checksums are verified.

    With ``world_size > 1`` only every ``world_size``-th image (starting at ``rank``) is decoded, so each
    DDP rank holds a disjoint shard without a shared disk.
    """
    fs, root = filesystem_and_path(uri)
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as stream:
            manifest = json.loads(stream.read())
    except (FileNotFoundError, OSError) as error:
        raise FileNotFoundError(f"{uri}: no {MANIFEST} (write shards with `sr-tune prepare`): {error}") from None
    tally = _BadImageTally(skip_bad, uri)
    images: list[SRImage] = []
    index = 0
    for shard in manifest["shards"]:
        location = f"{root}/{shard['file']}"
        with fs.open_input_stream(location) as stream:
            payload = stream.read()
        if hashlib.sha256(payload).hexdigest() != shard["sha256"]:
            raise BadImageError(f"{uri}/{shard['file']}: checksum mismatch (file changed or truncated)")
        table = pq.read_table(io.BytesIO(payload))
        for row in table.to_pylist():
            if index % world_size == rank:
                name = f"{uri}/{shard['file']}:{row['name']}"
                hr = tally.read(lambda: decode_image(row["png"], name))
                if hr is not None:
                    images.append(SRImage(name=row["name"], hr=hr))
            index += 1
    tally.finish()
    return images


# --- the built-in sample set and source specs -----------------------------------------------------------


def skimage_photo(name: str) -> torch.Tensor:
    """One of scikit-image's bundled photographs as uint8 (3, H, W)."""
    import skimage.data  # imported here: only the sample source needs it

    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise ValueError(f"scikit-image has no sample image {name!r}")
    image = loader()
    if isinstance(image, tuple):  # stereo_motorcycle -> (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"scikit-image sample {name!r} is {image.dtype}, expected uint8")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1).contiguous()


def sample_images(split: str, *, rank: int = 0, world_size: int = 1) -> list[SRImage]:
    names = shard_for_rank(SAMPLE_TRAIN if split == "train" else SAMPLE_VAL, rank, world_size)
    return [SRImage(name=name, hr=skimage_photo(name)) for name in names]


def source_image_problems(spec: str, *, skip_bad: bool = False) -> list[str]:
    """Every image file of a folder source that would fail to decode, found before anything starts (header
    checks, no pixels decoded). None to find with ``skip_bad`` (they are skipped when read), nor for the
    built-in set and shards (their checksums are verified when read)."""
    folder = Path(spec)
    if skip_bad or spec == "sample" or "://" in spec or (folder / MANIFEST).is_file() or not folder.is_dir():
        return []
    return [problem for path in list_image_files(folder) if (problem := image_file_problem(path))]


def source_problem(spec: str) -> str | None:
    """Why data spec ``spec`` cannot be read from here (None when it can), found before anything starts:
    a folder that does not exist, or shards whose manifest is missing or unreachable. Only looks, reads
    no image."""
    if spec == "sample":
        return None
    if "://" in spec:
        if problem := credential_problem(spec):
            return f"{spec!r} {problem}"
        try:
            found = probe(Storage.at(spec).uri_of(MANIFEST)) == "File"
        except (ConnectionError, ValueError) as error:
            return str(error)
        return None if found else f"{spec!r} holds no {MANIFEST} (write shards there with `sr-tune prepare`)"
    folder = Path(spec)
    if folder.is_dir():
        return None
    what = "is a file, not a folder" if folder.exists() else "does not exist"
    return f"{spec!r} {what} (resolved to {folder.resolve()}; 'sample' is the built-in photographs)"


# A sweep's trials that reuse a process read the same images trial after trial: the last source of each split
# stays decoded in the process (decoding a folder of photos again for each trial would take seconds or more),
# up to this many bytes, so that a large dataset is not held twice beside a trial's image bank.
DECODED_CACHE_BYTES = 1 << 30
_decoded: dict[str, tuple[tuple, list[SRImage]]] = {}  # split -> (what was read, its images)


def _source_version(spec: str) -> tuple | str | None:
    """What changes when a source's images do: nothing for the built-in photographs, the manifest for shards
    (it holds every shard's checksum), each file's size and modification time under a folder. None when the
    manifest cannot be read (decoding then says why)."""
    if spec == "sample":
        return ()
    if "://" in spec or (Path(spec) / MANIFEST).is_file():
        try:
            fs, root = filesystem_and_path(spec)
            with fs.open_input_stream(f"{root}/{MANIFEST}") as stream:
                return hashlib.sha256(stream.read()).hexdigest()
        except (OSError, ValueError):
            return None
    stats = sorted((str(path), path.stat()) for path in Path(spec).rglob("*") if path.is_file())
    return tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)


def open_source(spec: str, split: str, *, skip_bad: bool = False, rank: int = 0, world_size: int = 1) -> list[SRImage]:
    """Images of data spec ``spec`` for ``split`` ('train' or 'val'); only shard ``rank`` of ``world_size`` is decoded.

    ``spec`` is ``sample``; a URI or folder holding ``manifest.json`` (Parquet shards); a DIV2K root
    (``DIV2K_train_HR/``...); a benchmark folder (``HR/``); or any folder of images. The same call again in
    this process, on unchanged files, returns the images it decoded (bad ones skipped are not reported twice).
    """
    read = (spec, skip_bad, rank, world_size, _source_version(spec))
    if split in _decoded and _decoded[split][0] == read:
        return list(_decoded[split][1])
    images = _decode_source(spec, split, skip_bad=skip_bad, rank=rank, world_size=world_size)
    size = sum(image.hr.nbytes + sum(lr.nbytes for lr in image.lr.values()) for image in images)
    if size <= DECODED_CACHE_BYTES:
        _decoded[split] = (read, images)
    return list(images)


def _decode_source(spec: str, split: str, *, skip_bad: bool, rank: int, world_size: int) -> list[SRImage]:
    shard = {"rank": rank, "world_size": world_size}
    if spec == "sample":
        images = sample_images(split, **shard)
    elif "://" in spec or (Path(spec) / MANIFEST).is_file():
        images = read_shards(spec, skip_bad=skip_bad, **shard)
    elif (Path(spec) / "DIV2K_train_HR").is_dir() or (Path(spec) / "DIV2K_valid_HR").is_dir():
        images = read_div2k(Path(spec), split, skip_bad=skip_bad, **shard)
    elif (Path(spec) / "HR").is_dir():
        images = read_benchmark(Path(spec), skip_bad=skip_bad, **shard)
    else:
        images = list(iter_folder(Path(spec), skip_bad=skip_bad, **shard))
    if not images:
        where = f" for rank {rank} of {world_size}" if world_size > 1 else ""
        raise InputError(f"data source {spec!r} ({split}) holds no images{where}")
    return images
