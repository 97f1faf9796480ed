"""Training images: loaded once into one uint8 tensor, then batched by a stateless indexer.

The whole data set lives on the training device as uint8 (a quarter of float32's memory); a batch
is gathered by indexing and converted to [-1, 1] there, so no image crosses the bus per step.

A `folder` data set is the images that really lie in its folder: a file whose real path (symlinks
followed) leads out of the folder refuses the whole data set. The worker has already confined the
folder to the data roots (app/jobs/data_roots.py), so every file read lies inside them too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from app.spec import FOLDER_IMAGE_SUFFIXES as IMAGE_SUFFIXES
from app.spec import DatasetSpec

RESAMPLE = Image.Resampling.BICUBIC


class DatasetError(Exception):
    """The data set cannot be loaded; the message names the path and the reason."""


def load_images(spec: DatasetSpec) -> torch.Tensor:
    """All images of the data set as uint8 of shape (N, C, H, W), H = W = image_size, C = channels."""
    if spec.kind == "digits":
        return _load_digits(spec.image_size, spec.channels)
    if spec.kind == "folder":
        assert spec.path is not None  # enforced by DatasetSpec
        return _load_folder(Path(spec.path), spec.image_size, spec.channels)
    raise ValueError(f"unknown dataset kind {spec.kind!r}; expected 'digits' or 'folder'")


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 -1..1 (the range the forward process and sampler assume)."""
    return images.float() / 127.5 - 1.0  # (B, C, H, W)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float -1..1 -> uint8 0..255 (for writing PNGs)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _load_digits(image_size: int, channels: int) -> torch.Tensor:
    """The 1,797 8x8 scikit-learn digits (bundled with scikit-learn, no download)."""
    from sklearn.datasets import load_digits

    pixels = load_digits().images  # (N, 8, 8) float64 in 0..16
    pixels = np.rint(pixels * (255 / 16)).astype(np.uint8)
    images = [_resize(Image.fromarray(p), image_size, channels) for p in pixels]
    return torch.from_numpy(np.stack(images))  # (N, C, H, W)


def _load_folder(root: Path, image_size: int, channels: int) -> torch.Tensor:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"dataset folder {root} contains no .png/.jpg/.jpeg images")
    real_root = root.resolve()
    images = []
    for file in files:
        _refuse_if_outside(file, root, real_root)
        try:
            with Image.open(file) as img:
                img.load()
                images.append(_fit(img, image_size, channels))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"cannot read image {file} in dataset folder {root}: {e}") from e
    return torch.from_numpy(np.stack(images))  # (N, C, H, W)


def _refuse_if_outside(file: Path, root: Path, real_root: Path) -> None:
    """DatasetError when `file` is a link (or lies in a linked folder) leading out of the data set's
    folder: it could expose any file the worker can read, outside the data roots."""
    real = file.resolve()
    if not real.is_relative_to(real_root):
        raise DatasetError(
            f"image {file} in dataset folder {root} resolves to {real}, outside the folder; "
            "a folder data set may only link to files inside it"
        )


def _resize(img: Image.Image, size: int, channels: int) -> np.ndarray:
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return _to_array(img, channels)


def _fit(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """Convert to L/RGB, scale the shorter side to `size`, centre-crop the longer one."""
    img = img.convert("L" if channels == 1 else "RGB")
    return _to_array(ImageOps.fit(img, (size, size), method=RESAMPLE), channels)


def _to_array(img: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(img, dtype=np.uint8)  # (H, W) for L, (H, W, 3) for RGB
    if array.ndim == 2:
        return np.repeat(array[None], channels, axis=0)  # (C, H, W)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (C, H, W)


class BatchIndexer:
    """Which images make up the batch of each step: a pure function of (seed, step).

    The data is visited in epochs, each a fresh permutation drawn from `seed + epoch`; step s
    (0-based) takes positions [s*B, (s+1)*B) of the endless concatenation of epochs. Resuming
    at any step therefore needs no sampler state.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, device: torch.device | str = "cpu") -> None:
        if num_images < 1:
            raise ValueError("BatchIndexer needs at least one image")
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.device = torch.device(device)
        self._cache: dict[int, torch.Tensor] = {}  # epoch -> permutation on device (two at most)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The visiting order of epoch `epoch`, (N,) int64 on the device; drawn on CPU for portability."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                del self._cache[min(self._cache)]
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cache[epoch] = torch.randperm(self.num_images, generator=generator).to(self.device)
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Image indices for 0-based step `step`, (B,) int64 on the device."""
        n, start = self.num_images, step * self.batch_size
        stop = start + self.batch_size
        parts = []
        while start < stop:
            epoch, offset = divmod(start, n)
            take = min(n - offset, stop - start)
            parts.append(self.permutation(epoch)[offset : offset + take])
            start += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)
