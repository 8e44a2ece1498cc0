"""Image sources. For now the built-in ``sample`` set: real photographs that scikit-image ships.

Images come back as uint8 tensors (3, H, W); grey images are repeated to three channels, so colour
conversion (RGB or Y) happens in one place downstream.
"""

from __future__ import annotations

import numpy as np
import torch

# Fixed split. ``chelsea`` and ``cat`` are the same photograph, so only one is used.
SAMPLE_TRAIN = (
    "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "retina", "camera",
    "coins", "moon", "grass", "gravel", "brick", "page", "clock",
)  # fmt: skip
SAMPLE_VAL = ("astronaut", "coffee", "chelsea", "rocket")


def skimage_photo(name: str) -> torch.Tensor:
    """One of scikit-image's bundled photographs as uint8 (3, H, W)."""
    import skimage.data  # imported here: only the sample source needs it

    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise ValueError(f"scikit-image has no sample image {name!r}")
    image = loader()
    if isinstance(image, tuple):  # stereo_motorcycle -> (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"scikit-image sample {name!r} is {image.dtype}, expected uint8")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1).contiguous()


def load_images(spec: str, split: str) -> list[torch.Tensor]:
    """Images named by a data spec for ``split`` ('train' or 'val'); only 'sample' exists for now."""
    if spec != "sample":
        raise ValueError(f"unknown image source {spec!r}; available: sample")
    names = SAMPLE_TRAIN if split == "train" else SAMPLE_VAL
    return [skimage_photo(name) for name in names]
