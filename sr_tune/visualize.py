"""Pictures for humans: the LR | bicubic | SR | HR grid with PSNR captions, loss / PSNR curves, sweep plots."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw, ImageFont

from sr_tune.results import EvalResult, Preview

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TILE_MIN = 192  # px: smaller crops are enlarged (nearest) to at least this
TILE_CROP = 256  # px: larger images show their centre
CAPTION_HEIGHT = 24


def _to_pil(image: torch.Tensor) -> Image.Image:
    """(1 or 3, H, W) in [0, 1] -> 8-bit RGB image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")


def _tile(image: torch.Tensor) -> Image.Image:
    """The centre ``TILE_CROP`` square (at most) of (C, H, W), enlarged by a whole factor to >= ``TILE_MIN``."""
    height, width = image.shape[1:]
    top, left = max((height - TILE_CROP) // 2, 0), max((width - TILE_CROP) // 2, 0)
    crop = image[:, top : top + TILE_CROP, left : left + TILE_CROP]
    zoom = max(1, math.ceil(TILE_MIN / min(crop.shape[1:])))
    return _to_pil(crop.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1))


def grid_captions(preview: Preview) -> list[str]:
    bicubic, sr = preview.bicubic_psnr, preview.sr_psnr
    # The dB are of this one image; a run's val_psnr averages every validation image (the run says so).
    return ["LR (nearest)", f"bicubic {bicubic:.2f} dB", f"SR {sr:.2f} dB ({sr - bicubic:+.2f})", "HR; dB: this image"]


def preview_grid(preview: Preview) -> Image.Image:
    """LR (nearest) | bicubic | SR | HR side by side in colour, each tile at least ``TILE_MIN`` px and captioned
    with its PSNR-Y."""
    images = (preview.lr, preview.bicubic, preview.sr, preview.hr)
    tiles = [(caption, _tile(image)) for caption, image in zip(grid_captions(preview), images)]
    width, height = tiles[0][1].size
    grid = Image.new("RGB", (4 * width + 6, height + CAPTION_HEIGHT), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=15)
    for index, (caption, tile) in enumerate(tiles):
        grid.paste(tile, (index * (width + 2), CAPTION_HEIGHT))
        draw.text((index * (width + 2) + 3, 3), caption, fill="black", font=font)
    return grid


@functools.cache
def _pyplot() -> ModuleType:
    """matplotlib's pyplot, drawing to files only (workers have no display). Imported on first use: a sweep's
    trial processes only make preview grids, and importing matplotlib is a noticeable part of their start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def curves_figure(history: Sequence[EvalResult]) -> Figure:
    """Training loss (log scale) and validation PSNR-Y against bicubic, by step; a Delta-STN run adds the
    trajectory of each tuned hyperparameter."""
    steps = [r.step for r in history]
    tuned = [name for name in history[-1].hyper if not name.endswith("_scale")]
    figure, axes = _pyplot().subplots(1, 2 + len(tuned), figsize=(5 * (2 + len(tuned)), 4))
    loss_axis, psnr_axis = axes[:2]
    for axis, name in zip(axes[2:], tuned):
        axis.plot(steps, [r.hyper[name] for r in history], marker="o")
        log = name == "l2" or name.startswith("mix_")  # tuned on a log scale
        axis.set(xlabel="step", ylabel=name, yscale="log" if log else "linear", title=f"Delta-STN: {name}")
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
    figure, axis = _pyplot().subplots(figsize=(6, 4))
    axis.plot(xs, ys, drawstyle="steps-post")
    axis.set(xlabel="patches seen by the sweep", ylabel=f"best {metric} so far", title="sweep progress")
    figure.tight_layout()
    return figure


def importance_figure(shares: dict[str, float], metric: str) -> Figure:
    """Each searched key's share of the objective's variance (fANOVA), largest on top."""
    keys = list(shares)[::-1]
    figure, axis = _pyplot().subplots(figsize=(6, 1 + 0.5 * len(keys)))
    axis.barh(keys, [shares[key] for key in keys])
    axis.set(xlabel=f"importance for {metric} (share of variance)", xlim=(0, 1), title="what mattered")
    figure.tight_layout()
    return figure


@dataclass(frozen=True)
class TrialPoint:
    """One trial in a parameter plot."""

    name: str
    value: Any  # the plotted parameter's value
    objective: float  # the trial's best objective
    group: Any = None  # the colouring choice parameter's value
    best: bool = False
    stopped: bool = False  # stopped early by the scheduler


def _ordered(values: set[Any]) -> list[Any]:
    """Numbers by value (8 before 16), anything else by its text."""
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=str)


def parameter_figure(
    key: str, points: Sequence[TrialPoint], metric: str, *, kind: str, group_key: str | None
) -> Figure:
    """One searched parameter against each trial's best objective: the best trial starred and named, trials
    stopped early hollow, colours by ``group_key`` (a choice parameter). Choices sit side by side with a
    little spread so equal values stay visible."""
    figure, axis = _pyplot().subplots(figsize=(6, 4.5))
    categories = _ordered({p.value for p in points}) if kind == "choice" else []

    def x(index: int, point: TrialPoint) -> float:
        if not categories:
            return point.value
        return categories.index(point.value) + 0.25 * ((index * 0.618) % 1 - 0.5)

    from matplotlib.lines import Line2D

    groups = _ordered({p.group for p in points})
    colours = {group: _pyplot().get_cmap("tab10")(index % 10) for index, group in enumerate(groups)}
    for index, point in enumerate(points):
        colour, where = colours[point.group], (x(index, point), point.objective)
        face = "none" if point.stopped else [colour]
        axis.scatter(*where, s=50, facecolors=face, edgecolors=[colour], linewidths=1.5)
        if point.best:
            axis.scatter(*where, marker="*", s=320, c="gold", edgecolors="black", zorder=3)
            axis.annotate(point.name, where, textcoords="offset points", xytext=(8, 6))
    marker = {"marker": "o", "linestyle": ""}
    handles = [Line2D([], [], color=colours[g], label=f"{group_key} = {g}", **marker) for g in groups if group_key]
    handles.append(Line2D([], [], markerfacecolor="none", color="grey", label="stopped early", **marker))
    star = {"marker": "*", "linestyle": "", "markersize": 14, "markeredgecolor": "black"}
    handles.append(Line2D([], [], color="gold", label="best", **star))
    axis.legend(handles=handles, fontsize="small")
    axis.set(xlabel=key, ylabel=f"trial's best {metric}", xscale="log" if kind == "loguniform" else "linear", title=key)
    if categories:  # after the scale, which resets the ticks
        axis.set_xticks(range(len(categories)), [str(c) for c in categories])
        axis.set_xlim(-0.6, len(categories) - 0.4)
    figure.tight_layout()
    return figure


def schedule_figure(key: str, schedules: dict[str, Sequence[tuple[float, float]]]) -> Figure:
    """A hyperparameter against patches seen, one line per trial (how PBT moved it)."""
    figure, axis = _pyplot().subplots(figsize=(6, 4))
    for trial, points in schedules.items():
        axis.plot([p for p, _ in points], [v for _, v in points], marker=".", drawstyle="steps-post", label=trial)
    axis.set(xlabel="patches seen", ylabel=key, title=f"PBT schedule of {key}")
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure
