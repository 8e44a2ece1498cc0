"""Patches per second: our device-resident sampler vs a classic DataLoader pipeline, side by side.

Both read the same PNG files (the built-in sample photographs written to a temp folder), cut the same
patch size, augment, convert to Y and make LR with the same MATLAB-compatible bicubic. The classic
pipeline is what most SR repositories do: a Dataset that opens, decodes, crops and augments one image per
sample with PIL and torchvision transforms, batched by a torch DataLoader with 2 worker processes. Two
rows: flips/rot90 only, and flips plus random affine and perspective warps at strength 1.

    python benchmarks/sampler.py [--quick] [--device cuda] [--batches 200] [--batch-size 16] [--lr-patch 11]
        [--scale 3]

``--quick``: 20 batches a row (a check that it runs, in about half a minute on 2 CPUs; not a measurement).

``--baseline REV`` instead times our sampler's batches (flips/rot90, Y, built as training builds it) against
the sampler of git revision REV (a worktree), each in a fresh process, in rounds of this, REV, REV, this; it
prints ms per batch and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from sr_tune.data import augment
from sr_tune.data.augment import Augmenter
from sr_tune.data.degrade import degrade
from sr_tune.data.sampler import ImageBank, PatchSampler, to_model_space
from sr_tune.data.sources import list_image_files, read_image, sample_images


class ClassicPatches(Dataset):
    """One random patch per item: PIL open + decode + crop + augment, per sample, in a worker process."""

    def __init__(
        self, files: list[Path], hr_size: int, scale: int, length: int, strength: float, color: str = "y"
    ) -> None:
        self.files, self.hr_size, self.scale, self.length, self.color = files, hr_size, scale, length, color
        self.crop_size = Augmenter(strength=strength).crop_size(hr_size)
        self.warps = None
        if strength > 0:  # the same ranges as ours, in torchvision's terms
            self.warps = v2.Compose(
                [
                    v2.RandomPerspective(distortion_scale=augment.MAX_CORNER_SHIFT * strength, p=1.0),
                    v2.RandomAffine(
                        degrees=augment.MAX_ROTATION_DEGREES * strength,
                        translate=(augment.MAX_TRANSLATE * strength,) * 2,
                        scale=(augment.MAX_ZOOM**-strength, augment.MAX_ZOOM**strength),
                        shear=augment.MAX_SHEAR_DEGREES * strength,
                    ),
                    v2.CenterCrop(hr_size),
                ]
            )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(item)
        with Image.open(self.files[rng.integers(len(self.files))]) as image:
            rgb = np.asarray(image.convert("RGB"))
        top = rng.integers(rgb.shape[0] - self.crop_size + 1)
        left = rng.integers(rgb.shape[1] - self.crop_size + 1)
        crop = rgb[top : top + self.crop_size, left : left + self.crop_size]
        if self.warps is not None:
            crop = np.asarray(self.warps(Image.fromarray(crop)))
        patch = np.rot90(crop, rng.integers(4))[:, :: rng.choice([-1, 1])]
        hr = to_model_space(torch.from_numpy(patch.copy()).permute(2, 0, 1)[None], self.color)[0]  # (C, P, P)
        return degrade(hr, self.scale), hr


def patches_per_second(batches, count: int, batch_size: int, device: torch.device) -> float:
    iterator = iter(batches)
    next(iterator)  # warm-up: worker start-up, caches, CUDA context
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(count):
        lr, hr = next(iterator)
        lr, hr = lr.to(device, non_blocking=True), hr.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count * batch_size / (time.perf_counter() - start)


ROOT = Path(__file__).resolve().parent.parent
TIME_BATCHES = """
import time, torch
from sr_tune.config import load_config
from sr_tune.engine import build_data
torch.set_num_threads({threads})
settings = ["model.scale={scale}", "data.lr_patch_size={lr_patch}", "data.batch_size={batch_size}", "data.color=y"]
sampler, _ = build_data(load_config(None, settings), torch.device("{device}"), 0, 1)  # as training builds it
for step in range(24):
    sampler.batch(step)
started = time.perf_counter()
for step in range(24, 24 + {batches}):
    sampler.batch(step)
print((time.perf_counter() - started) / {batches})
"""


def compare_with(revision: str, args: argparse.Namespace, rounds: int = 3) -> None:
    """ms per batch of this checkout's sampler and of ``revision``'s, each in a fresh process."""
    code = TIME_BATCHES.format(threads=torch.get_num_threads(), **vars(args))
    with tempfile.TemporaryDirectory(prefix="baseline-") as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision], check=True)
        try:
            seconds: dict[str, list[float]] = {"this checkout": [], revision: []}
            for _ in range(rounds):
                for label, source in (
                    ("this checkout", ROOT),
                    (revision, tree),
                    (revision, tree),
                    ("this checkout", ROOT),
                ):
                    env = {**os.environ, "PYTHONPATH": str(source)}
                    done = subprocess.run(  # in the tree: `python -c` puts the working folder first on the path
                        [sys.executable, "-c", code], cwd=source, env=env, capture_output=True, text=True, check=True
                    )
                    seconds[label].append(float(done.stdout))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    mine, theirs = (statistics.median(seconds[label]) * 1000 for label in seconds)
    hr_size = args.lr_patch * args.scale
    print(f"HR patch {hr_size}, x{args.scale}, batch {args.batch_size}, Y, flips/rot90, {args.batches} batches")
    print(f"this checkout {mine:.3f} ms/batch, {revision} {theirs:.3f} ms/batch (medians of {2 * rounds})")
    print(f"this checkout / {revision}: {mine / theirs:.2f}x the time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 batches a row: checks that it runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr-patch", type=int, default=11)
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline", help="compare our sampler with this git revision's instead")
    args = parser.parse_args()
    if args.quick:
        args.batches = 20
    if args.baseline:
        compare_with(args.baseline, args)
        return
    device = torch.device(args.device)
    hr_size = args.lr_patch * args.scale

    with tempfile.TemporaryDirectory() as folder:
        for image in sample_images("train"):
            Image.fromarray(image.hr.permute(1, 2, 0).numpy()).save(Path(folder) / f"{image.name}.png")
        files = list_image_files(Path(folder))

        start = time.perf_counter()
        decoded = [read_image(f) for f in files]  # decoding once is part of our cost
        load_seconds = time.perf_counter() - start

        rows = []
        for label, strength in (("flips/rot90", 0.0), ("flips + warps at strength 1", 1.0)):
            bank = ImageBank(decoded, device, luma=strength == 0)  # as training builds it for a Y model
            dataset = ClassicPatches(files, hr_size, args.scale, (args.batches + 1) * args.batch_size, strength)
            classic = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=True)
            classic_rate = patches_per_second(classic, args.batches, args.batch_size, device)
            sampler = PatchSampler(
                bank,
                scale=args.scale,
                lr_patch_size=args.lr_patch,
                batch_size=args.batch_size,
                color="y",
                augmenter=Augmenter(strength=strength),
            )
            ours_rate = patches_per_second(
                (sampler.batch(step) for step in range(args.batches + 1)), args.batches, args.batch_size, device
            )
            rows.append((label, classic_rate, ours_rate))

    print(
        f"device {device}, {len(files)} images, HR patch {hr_size}, x{args.scale}, batch {args.batch_size}, "
        f"{args.batches} batches; our images decoded in {load_seconds:.1f} s"
    )
    print(f"{'augmentation':<30}{'classic (patches/s)':>22}{'sr_tune (patches/s)':>22}{'ratio':>9}")
    for label, classic_rate, ours_rate in rows:
        print(f"{label:<30}{classic_rate:>22,.0f}{ours_rate:>22,.0f}{ours_rate / classic_rate:>8.1f}x")


if __name__ == "__main__":
    main()
