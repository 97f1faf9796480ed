"""A Pillow image as training sees it: 8-bit L or RGB, fitted to a square, as a uint8 (C, H, W) array.

One implementation for every path into training: the `digits` and `folder` data sets
(worker/ddpm/data.py) and the decoded arrays cached for users' data sets
(worker/datasets/cache.py), so an image gives the same pixels whichever way it comes in. Pillow
and numpy only (no torch): the worker decodes data sets in processes that need not load torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

RESAMPLE = Image.Resampling.BICUBIC


def fit_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Convert to L/RGB, scale the shorter side to `size`, centre-crop the longer one: (C, size, size) uint8."""
    img = img.convert("L" if channels == 1 else "RGB")
    return to_array(ImageOps.fit(img, (size, size), method=RESAMPLE), channels)


def resize_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Scale (without cropping) to size x size: (C, size, size) uint8. For images already square."""
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return to_array(img, channels)


def to_array(img: Image.Image, channels: int) -> np.ndarray:
    """An L or RGB image as (C, H, W) uint8; L is repeated over `channels`."""
    array = np.asarray(img, dtype=np.uint8)  # (H, W) for L, (H, W, 3) for RGB
    if array.ndim == 2:
        return np.repeat(array[None], channels, axis=0)  # (C, H, W)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (C, H, W)
