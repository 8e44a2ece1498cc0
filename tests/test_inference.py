"""Tiled inference equals whole-image inference with bounded memory; `sr-tune eval` and `upscale` on real files."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr_tune.checkpoint import load_checkpoint, save_checkpoint
from sr_tune.config import load_config
from sr_tune.data.degrade import imresize, to_8bit
from sr_tune.data.sources import skimage_photo
from sr_tune.inference import Upscaler, receptive_radius, upscale_tiled
from sr_tune.metrics import psnr, rgb_to_ycbcr, ycbcr_to_rgb
from sr_tune.models import create_model

SR_TUNE = Path(sys.executable).with_name("sr-tune")


def test_tiles_of_a_4000x3000_image_equal_whole_image_inference_in_bounded_memory():
    torch.manual_seed(0)
    model = create_model("fsrcnn_s", scale=2).eval()
    margin = receptive_radius(model, 1)
    assert margin >= 5  # FSRCNN-s: 5x5 + 3x3 mapping; the 9x9 deconvolution adds more at HR
    photo = skimage_photo("astronaut")[0:1].float()[None] / 255  # (1, 1, 512, 512)
    lr = photo.repeat(1, 1, 6, 8)[:, :, :3000, :4000]  # a 4000x3000 Y image with real content
    largest: list[int] = []
    hook = model.register_forward_pre_hook(lambda module, inputs: largest.append(inputs[0].numel()))
    tiled = upscale_tiled(model, lr, 2, tile=256, margin=margin)
    hook.remove()
    assert len(largest) == math.ceil(3000 / 256) * math.ceil(4000 / 256)  # one forward per tile
    assert max(largest) <= (256 + 2 * margin) ** 2  # never more than one tile and its margins
    with torch.no_grad():
        whole = model(lr)
    assert tiled.shape == whole.shape == (1, 1, 6000, 8000)
    assert float((tiled - whole).abs().max()) < 1e-5


def make_checkpoint(tmp_path: Path, color: str) -> Path:
    config = load_config(None, ["model.name=fsrcnn_s", "model.scale=2", f"data.color={color}"])
    torch.manual_seed(1)
    model = create_model("fsrcnn_s", scale=2, in_channels=config.in_channels)
    return save_checkpoint(tmp_path / f"ckpt_{color}", model=model, config=config, step=7)


def test_upscale_checks_every_input_before_writing_anything(tmp_path: Path):
    checkpoint = make_checkpoint(tmp_path, "y")
    good = tmp_path / "good.png"
    Image.fromarray(skimage_photo("coffee")[:, :40, :40].permute(1, 2, 0).numpy()).save(good)
    (tmp_path / "fake.png").write_text("not an image")
    command = [str(SR_TUNE), "upscale", str(good), str(tmp_path / "missing.png"), str(tmp_path / "fake.png")]
    result = subprocess.run(
        [*command, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert "missing.png: cannot read (No such file or directory)" in result.stderr
    assert "fake.png: cannot decode image (not a format Pillow reads" in result.stderr
    assert not (tmp_path / "out").exists()


def test_upscale_command_writes_every_image(tmp_path: Path):
    checkpoint = make_checkpoint(tmp_path, "y")
    inputs = []
    for name, (h, w) in {"coffee": (123, 301), "rocket": (300, 77)}.items():
        path = tmp_path / f"{name}.png"
        Image.fromarray(skimage_photo(name)[:, :h, :w].permute(1, 2, 0).numpy()).save(path)
        inputs.append(path)
    result = subprocess.run(
        [
            str(SR_TUNE),
            "upscale",
            *map(str, inputs),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "out"),
            "--tile",
            "64",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    coffee = np.asarray(Image.open(tmp_path / "out" / "coffee_x2.png"))
    assert coffee.shape == (246, 602, 3) and np.asarray(Image.open(tmp_path / "out" / "rocket_x2.png")).shape == (
        600,
        154,
        3,
    )
    # Tiles of 64 give what one whole-image pass gives (up to 8-bit rounding).
    image = skimage_photo("coffee")[:, :123, :301]
    expected = Upscaler(create_model("fsrcnn_s", scale=2, in_channels=1), scale=2, color="y", tile=1000)
    expected.model.load_state_dict(load_checkpoint(checkpoint).model_state)
    assert np.abs(expected.rgb(image).permute(1, 2, 0).numpy().astype(int) - coffee.astype(int)).max() <= 1


def test_eval_command_prints_the_paper_table_by_the_8_bit_protocol_unless_told_float(tmp_path: Path):
    checkpoint = make_checkpoint(tmp_path, "rgb")
    for name in ("astronaut", "chelsea"):
        folder = tmp_path / "Set2" / "HR"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(skimage_photo(name)[:, :101, :90].permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    rows = {}
    for flags in ([], ["--float"]):
        result = subprocess.run(
            [str(SR_TUNE), "eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "Set2"), *flags],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        row = next(line for line in result.stdout.splitlines() if line.startswith("Set2"))
        rows[bool(flags)] = row.split()
        assert rows[bool(flags)][1:3] == ["x2", "2"]
    # The benchmark protocol: modcrop, MATLAB bicubic, Y, 2-pixel border; by default LR and both outputs are
    # 8-bit images, as published tables measure them.
    model = load_checkpoint(checkpoint).build_model().eval()
    for eight_bit in (True, False):
        bicubic_psnr, model_psnr = [], []
        for name in ("astronaut", "chelsea"):
            hr = skimage_photo(name)[None, :, :100, :90].float() / 255
            lr = imresize(hr, scale=0.5)
            lr = to_8bit(lr) if eight_bit else lr
            outputs = [imresize(lr, scale=2).clamp(0, 1), model(lr).detach().clamp(0, 1)]
            outputs = [to_8bit(o) if eight_bit else o for o in outputs]
            bicubic_psnr.append(psnr(outputs[0], hr, crop_border=2, y_channel=True).item())
            model_psnr.append(psnr(outputs[1], hr, crop_border=2, y_channel=True).item())
        fields = rows[not eight_bit]
        assert float(fields[3]) == round(sum(bicubic_psnr) / 2, 2)
        assert float(fields[6]) == pytest.approx(sum(model_psnr) / 2, abs=0.006)
    assert rows[True] != rows[False]


@pytest.mark.parametrize("color", ["y", "rgb"])
def test_8_bit_upscaling_tile_by_tile_equals_the_whole_image_pass(color: str):
    """Chroma (bicubic) and the model both work per tile, from the 8-bit input to the 8-bit output; the
    result is the whole-image pass's, and the model never sees more than one tile and its margins."""
    torch.manual_seed(2)
    channels = 1 if color == "y" else 3
    upscaler = Upscaler(create_model("fsrcnn_s", scale=3, in_channels=channels), scale=3, color=color, tile=40)
    image = skimage_photo("coffee")[:, :101, :139]  # odd sizes: partial tiles at both borders
    largest: list[int] = []
    hook = upscaler.model.register_forward_pre_hook(lambda module, inputs: largest.append(inputs[0].shape[-1]))
    tiled = upscaler.rgb(image)
    hook.remove()
    assert tiled.shape == (3, 303, 417) and tiled.dtype == torch.uint8
    assert len(largest) == 3 * 4 and max(largest) <= 40 + 2 * upscaler.margin

    with torch.no_grad():  # the whole image at once, in floating point, quantized once at the end
        rgb = image[None].float() / 255
        if color == "rgb":
            whole = upscaler.model(rgb).clamp(0, 1)
        else:
            ycbcr = rgb_to_ycbcr(rgb)
            luma = upscaler.model(ycbcr[:, :1]).clamp(0, 1)
            whole = ycbcr_to_rgb(torch.cat([luma, imresize(ycbcr[:, 1:], scale=3)], dim=1))
    expected = (whole[0].clamp(0, 1) * 255).round()
    differences = (tiled.float() - expected).abs()
    assert float(differences.max()) <= 1 and float((differences > 0).float().mean()) < 1e-3  # float rounding


PEAK_PROBE = """
import resource, sys, torch
from sr_tune.data.sources import skimage_photo
from sr_tune.inference import Upscaler
from sr_tune.models import create_model
torch.manual_seed(0)
upscaler = Upscaler(create_model("fsrcnn_s", scale=2, in_channels=1), scale=2, color="y", tile=int(sys.argv[1]))
image = skimage_photo("coffee").repeat(1, 4, 4)[:, :1500, :2000].contiguous()  # 2000x1500 RGB
upscaler.rgb(image[:, :64, :64])  # warmed up: what any call allocates once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sr = upscaler.rgb(image)
print(sr.shape[1], sr.shape[2], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_upscaling_memory_is_set_by_the_tile_not_the_image():
    """A 2000x1500 photo at x2: the process grows by little more than the 8-bit output (36 MB), for small and
    large tiles alike (whole-image float buffers took over 1 GB)."""
    grown = {}
    for tile in (64, 256):
        probe = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(tile)], capture_output=True, text=True)
        assert probe.returncode == 0, probe.stderr[-2000:]
        height, width, grown[tile] = map(int, probe.stdout.split())
        assert (height, width) == (3000, 4000)
    assert max(grown.values()) < 200, grown  # MiB
