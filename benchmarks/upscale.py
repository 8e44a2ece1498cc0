"""Tiled vs whole-image upscaling: throughput and the memory a process grows by, side by side.

Each measurement is a fresh process (peak RSS is a high-water mark) that builds the model, warms it up on a
small image, then upscales one photo (scikit-image's ``coffee`` tiled to the size asked) with
``Upscaler.rgb`` exactly as ``sr-tune upscale`` does: 8-bit RGB in, 8-bit RGB out. "whole" is one tile the
size of the image. Runs alternate between the settings, ``--repeats`` times; medians are printed.

    python benchmarks/upscale.py [--quick] [--model srcnn_915] [--scale 3] [--size 2000x1500] [--repeats 3]

``--quick``: a 600x450 photo, one repeat (about a minute on 2 CPUs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

PROBE = """
import resource, sys, time, torch
from sr_tune.data.sources import skimage_photo
from sr_tune.inference import Upscaler
from sr_tune.models import create_model
model_name, scale, color, width, height, tile = sys.argv[1], int(sys.argv[2]), sys.argv[3], *map(int, sys.argv[4:7])
torch.manual_seed(0)
model = create_model(model_name, scale=scale, in_channels=1 if color == "y" else 3)
photo = skimage_photo("coffee")
image = photo.repeat(1, height // photo.shape[1] + 1, width // photo.shape[2] + 1)[:, :height, :width].contiguous()
upscaler = Upscaler(model, scale=scale, color=color, tile=tile or max(width, height))
upscaler.rgb(image[:, :64, :64])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
upscaler.rgb(image)
seconds = time.perf_counter() - started
print(seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def measure(model: str, scale: int, color: str, width: int, height: int, tile: int) -> tuple[float, float]:
    """(seconds, MiB the process grew by) for one upscale; ``tile`` 0 is the whole image at once."""
    args = [model, str(scale), color, str(width), str(height), str(tile)]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    seconds, grown = map(float, done.stdout.split())
    return seconds, grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="srcnn_915")
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--color", default="y", choices=["y", "rgb"])
    parser.add_argument("--size", default="2000x1500", help="WxH of the LR photo")
    parser.add_argument("--tiles", default="64,128,256,512", help="tile sides to compare with the whole image")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    width, height = (600, 450) if args.quick else map(int, args.size.split("x"))
    repeats = 1 if args.quick else args.repeats
    settings = [0, *map(int, args.tiles.split(","))]
    output_mib = width * height * args.scale**2 * 3 / 2**20

    results: dict[int, list[tuple[float, float]]] = {tile: [] for tile in settings}
    for _ in range(repeats):
        for tile in settings:
            results[tile].append(measure(args.model, args.scale, args.color, width, height, tile))
    megapixels = width * height * args.scale**2 / 1e6
    whole_seconds = statistics.median(s for s, _ in results[0])
    print(f"{args.model} x{args.scale} ({args.color}), {width}x{height} -> {width * args.scale}x{height * args.scale}")
    print(f"8-bit output image: {output_mib:.0f} MiB; medians of {repeats} run(s)\n")
    print(f"{'tile':>6} {'seconds':>8} {'output MP/s':>12} {'grew MiB':>9} {'vs whole':>9}")
    for tile in settings:
        seconds = statistics.median(s for s, _ in results[tile])
        grown = statistics.median(g for _, g in results[tile])
        name = "whole" if tile == 0 else str(tile)
        print(f"{name:>6} {seconds:>8.2f} {megapixels / seconds:>12.2f} {grown:>9.0f} {whole_seconds / seconds:>8.2f}x")


if __name__ == "__main__":
    main()
