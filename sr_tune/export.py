"""``sr-tune export``: a checkpoint's network as ONNX with dynamic height and width, checked with onnxruntime.

The graph is the network in model space (luma for Y models, RGB for RGB models, values in [0, 1], shape
(N, C, h, w) -> (N, C, h*s, w*s)). Families whose network runs on the bicubic-upscaled image (SRCNN, VDSR
and the plain CNNs: ``after_bicubic``) export that network alone, since MATLAB's bicubic is built per image
size: their graph takes the bicubic-upscaled image (N, C, h*s, w*s), and the model's metadata says so.
onnx, onnxscript and onnxruntime come with the ``onnx`` extra (``pip install 'sr_tune[onnx]'``).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sr_tune.checkpoint import Checkpoint
from sr_tune.errors import InputError

CHECK_SIZE = (37, 53)  # LR height and width of the check: odd, and unlike the export's example
TOLERANCE = 1e-4
ONNX_EXTRA = "pip install 'sr_tune[onnx]' (onnx, onnxscript and onnxruntime)"


class _AfterBicubic(nn.Module):
    """A bicubic-front-end model's network alone: (N, C, H, W) upscaled -> (N, C, H, W)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, upscaled: torch.Tensor) -> torch.Tensor:
        return self.model.after_bicubic(upscaled)


@dataclass(frozen=True)
class Exported:
    path: Path
    input_name: str  # "lr", or "bicubic_upscaled" for a network behind a bicubic front end
    max_difference: float  # onnxruntime against torch at ``CHECK_SIZE``


def takes_upscaled_input(model: nn.Module) -> bool:
    return hasattr(model, "after_bicubic")


def export_onnx(checkpoint: Checkpoint, out: Path) -> Exported:
    """Write ``checkpoint``'s network to ``out`` (whole or not at all), then run it with onnxruntime at
    ``CHECK_SIZE`` against torch; a difference past ``TOLERANCE`` is an error."""
    if missing := [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]:
        raise InputError(f"exporting to ONNX needs {', '.join(missing)}: {ONNX_EXTRA}")
    config = checkpoint.config
    scale, channels = config.model.scale, config.in_channels
    model = checkpoint.build_model().eval()
    upscaled = takes_upscaled_input(model)
    graph, input_name = (_AfterBicubic(model), "bicubic_upscaled") if upscaled else (model, "lr")
    factor = scale if upscaled else 1  # the input's size per LR pixel
    example = torch.rand(1, channels, 24 * factor, 24 * factor)
    dynamic = {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[input_name],
            output_names=["sr"],
            dynamic_shapes=({0: torch.export.Dim("batch"), **dynamic},),
            verbose=False,
        )
    program.model.metadata_props.update(
        {
            "sr_tune_model": config.model.name,
            "scale": str(scale),
            "color": config.data.color,
            "input": (
                f"{input_name}: (N, {channels}, H, W) in [0, 1], "
                + (f"the image already upscaled x{scale} by MATLAB-style bicubic" if upscaled else "the LR image")
                + (" (luma Y of YCbCr, BT.601; chroma by bicubic)" if config.data.color == "y" else " (RGB)")
            ),
            "output": f"sr: (N, {channels}, H, W) at {'the input size' if upscaled else f'x{scale} the input size'}",
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # A file of its own beside the target, renamed into place: the output is whole or absent.
    handle, partial = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(handle)
    try:
        program.save(partial)
        difference = _check(partial, graph, input_name, channels, factor)
        if difference > TOLERANCE:
            raise InputError(
                f"{out}: onnxruntime and torch differ by {difference:.2e} at {CHECK_SIZE[0]}x{CHECK_SIZE[1]} "
                f"(more than {TOLERANCE:g}); not written"
            )
        os.replace(partial, out)
    finally:
        Path(partial).unlink(missing_ok=True)
    return Exported(out, input_name, difference)


@torch.no_grad()
def _check(path: str, graph: nn.Module, input_name: str, channels: int, factor: int) -> float:
    """The largest difference between onnxruntime and torch on one odd-sized input."""
    import onnxruntime

    height, width = CHECK_SIZE
    probe = torch.rand(1, channels, height * factor, width * factor, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (answer,) = session.run(["sr"], {input_name: probe.numpy()})
    return float((torch.from_numpy(answer) - graph(probe)).abs().max())
