"""Pictures for humans: the LR | bicubic | SR | HR grid with PSNR captions, and loss / PSNR curves."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; workers have no display

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from sr_tune.engine import EvalResult, Preview  # noqa: E402

CAPTION_HEIGHT = 14


def _to_pil(image: torch.Tensor) -> Image.Image:
    """(1 or 3, H, W) in [0, 1] -> 8-bit grey or RGB image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")


def preview_grid(preview: Preview) -> Image.Image:
    """LR (nearest) | bicubic | SR | HR side by side, each captioned (PSNR-Y where it applies)."""
    panels = [
        ("LR (nearest)", preview.lr),
        (f"bicubic {preview.bicubic_psnr:.2f} dB", preview.bicubic),
        (f"SR {preview.sr_psnr:.2f} dB", preview.sr),
        ("HR", preview.hr),
    ]
    height, width = preview.hr.shape[1:]
    grid = Image.new("RGB", (4 * width, height + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    for index, (caption, image) in enumerate(panels):
        grid.paste(_to_pil(image), (index * width, CAPTION_HEIGHT))
        draw.text((index * width + 2, 1), caption, fill="black")
    return grid


def curves_figure(history: Sequence[EvalResult]) -> Figure:
    """Training loss (log scale) and validation PSNR-Y against bicubic, by step."""
    steps = [r.step for r in history]
    figure, (loss_axis, psnr_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(steps, [r.loss for r in history], marker="o")
    loss_axis.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    psnr_axis.plot(steps, [r.psnr for r in history], marker="o", label="model")
    psnr_axis.plot(steps, [r.bicubic_psnr for r in history], linestyle="--", label="bicubic")
    psnr_axis.set(xlabel="step", ylabel="PSNR-Y (dB)", title="validation")
    psnr_axis.legend()
    figure.tight_layout()
    return figure


def best_so_far_figure(points: Sequence[tuple[float, float]], metric: str, mode: str) -> Figure:
    """Best objective so far against the patches the whole sweep has trained on, from (patches, value)
    points in the order they were reported."""
    best, xs, ys = None, [], []
    for patches, value in points:
        best = value if best is None else (max(best, value) if mode == "max" else min(best, value))
        xs.append(patches)
        ys.append(best)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(xs, ys, drawstyle="steps-post")
    axis.set(xlabel="patches seen by the sweep", ylabel=f"best {metric} so far", title="sweep progress")
    figure.tight_layout()
    return figure


def parameter_figure(key: str, values: Sequence[float], objectives: Sequence[float], metric: str, log: bool) -> Figure:
    """One searched parameter against each trial's best objective."""
    figure, axis = plt.subplots(figsize=(5, 4))
    axis.scatter(values, objectives)
    axis.set(xlabel=key, ylabel=f"trial's best {metric}", xscale="log" if log else "linear", title=key)
    figure.tight_layout()
    return figure


def schedule_figure(key: str, schedules: dict[str, Sequence[tuple[float, float]]]) -> Figure:
    """A hyperparameter against patches seen, one line per trial (how PBT moved it)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for trial, points in schedules.items():
        axis.plot([p for p, _ in points], [v for _, v in points], marker=".", drawstyle="steps-post", label=trial)
    axis.set(xlabel="patches seen", ylabel=key, title=f"PBT schedule of {key}")
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure
