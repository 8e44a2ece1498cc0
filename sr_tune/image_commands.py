"""``sr-tune eval``, ``upscale``, ``import-weights`` and ``prepare``: the commands that read and write images
and checkpoints (no Ray, no MLflow). Each checks everything it will read and write before its first output."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from sr_tune import preflight
from sr_tune.config import DataConfig, ModelConfig, TrainConfig
from sr_tune.fields import ConfigError


def cmd_eval(args: argparse.Namespace) -> int:
    from sr_tune.checkpoint import load_checkpoint
    from sr_tune.data.sources import open_source, source_image_problems, source_problem
    from sr_tune.data.validation import protocol_scores, validation_pairs
    from sr_tune.inference import Upscaler

    # Every folder and image checked before the first row is printed.
    problems = [f"--data {problem}" for folder in args.data if (problem := source_problem(folder))]
    problems += [problem for folder in args.data for problem in source_image_problems(folder)]
    if problems:
        raise ConfigError(problems, "sr-tune eval")
    checkpoint = load_checkpoint(args.checkpoint)
    config, scale = checkpoint.config, checkpoint.config.model.scale
    upscaler = Upscaler(checkpoint.build_model(), scale=scale, color=config.data.color, tile=args.tile)
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

    from sr_tune.checkpoint import load_checkpoint
    from sr_tune.data.sources import MAX_INPUT_PIXELS, image_file_problem, read_image
    from sr_tune.inference import Upscaler

    # Everything is checked before the first output is written (the checkpoint, every input, the size of
    # every output, every target file): a bad one leaves nothing half done and nothing of the user's replaced.
    checkpoint = load_checkpoint(args.checkpoint)
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
    config = checkpoint.config
    upscaler = Upscaler(checkpoint.build_model(), scale=scale, color=config.data.color, tile=args.tile)
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
                Image.fromarray(sr.permute(1, 2, 0).numpy()).save(file, format="PNG")
            except BaseException:
                partial.unlink()
                raise
        os.replace(partial, target)
        print(
            f"{path} ({image.shape[2]}x{image.shape[1]}) -> {target} ({sr.shape[2]}x{sr.shape[1]}) "
            f"in {time.perf_counter() - started:.1f} s"
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
