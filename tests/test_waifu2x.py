"""Published waifu2x vgg_7 weights: import, equality with an independent forward, and real gains."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sr_tune.checkpoint import load_checkpoint
from sr_tune.cli import main
from sr_tune.data.degrade import imresize
from sr_tune.metrics import psnr, rgb_to_y
from sr_tune.models.waifu2x import read_vgg7_weights

from .conftest import PHOTOS

MEMBER = "waifu2x/models/vgg7/anime_style_scale_y.npz"


@pytest.fixture(scope="module")
def imported(waifu2x_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("waifu2x") / "vgg7_y"
    assert main(["import-weights", "waifu2x-vgg7", str(waifu2x_wheel), str(out)]) == 0
    return out


def independent_forward(arrays: dict[str, np.ndarray], y_lr: np.ndarray) -> np.ndarray:
    """waifu2x's own recipe, written from its source: NN x2, edge pad 7, 7 valid convs, LeakyReLU 0.1."""
    x = np.repeat(np.repeat(y_lr, 2, axis=0), 2, axis=1)
    x = np.pad(x, 7, mode="edge")
    h = torch.from_numpy(x.astype(np.float32))[None, None]
    for i in range(1, 8):
        h = F.conv2d(h, torch.from_numpy(arrays[f"conv{i}/W"]), torch.from_numpy(arrays[f"conv{i}/b"]))
        if i < 7:
            h = F.leaky_relu(h, 0.1)
    return h[0, 0].numpy()


def y_pair(photo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR Y, HR Y) as (1, 1, h, w) float64: HR cropped to even size, LR by MATLAB bicubic x1/2."""
    hr = photo[:, : photo.shape[1] // 2 * 2, : photo.shape[2] // 2 * 2][None]
    lr = imresize(hr, scale=0.5).clamp(0, 1)
    return rgb_to_y(lr), rgb_to_y(hr)


def test_import_writes_a_loadable_checkpoint(imported: Path):
    checkpoint = load_checkpoint(imported)
    assert checkpoint.config.model.name == "waifu2x_vgg7" and checkpoint.config.model.scale == 2
    assert checkpoint.config.data.color == "y"
    assert checkpoint.model_state["conv1.weight"].shape == (32, 1, 3, 3)


def test_output_equals_an_independent_forward(imported: Path, waifu2x_wheel: Path, photos):
    with zipfile.ZipFile(waifu2x_wheel) as wheel, np.load(io.BytesIO(wheel.read(MEMBER))) as npz:
        arrays = {k: npz[k] for k in npz.files}
    model = load_checkpoint(imported).build_model()
    y_lr, _ = y_pair(photos["chelsea"])
    ours = model(y_lr.float()).detach()[0, 0].numpy()
    reference = independent_forward(arrays, y_lr[0, 0].numpy())
    assert ours.shape == (y_lr.shape[2] * 2, y_lr.shape[3] * 2)
    assert np.abs(ours - reference).max() < 1e-5


def test_x2_beats_bicubic_by_more_than_1db_on_real_photographs(imported: Path, photos):
    model = load_checkpoint(imported).build_model()
    gains = []
    for name in PHOTOS:
        y_lr, y_hr = y_pair(photos[name])
        with torch.no_grad():
            sr = model(y_lr.float()).double().clamp(0, 1)
        bicubic = imresize(y_lr, scale=2).clamp(0, 1)
        gain = psnr(sr, y_hr, crop_border=2).item() - psnr(bicubic, y_hr, crop_border=2).item()
        gains.append(gain)
    # Measured: astronaut +2.83, coffee +2.04, chelsea +0.60, rocket +2.06 dB.
    assert all(0.3 < g < 3.5 for g in gains), gains
    assert sum(gains) / len(gains) > 1.0, gains


def test_bad_weight_files_are_named(tmp_path: Path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **{"conv1/W": np.zeros((32, 1, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"wrong.npz: not a waifu2x vgg_7 weight file \(missing keys"):
        read_vgg7_weights(wrong)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="garbage.npz: not a NumPy .npz weight file"):
        read_vgg7_weights(garbage)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps waifu2x==2024.0.1"):
        read_vgg7_weights(tmp_path / "absent.whl")
