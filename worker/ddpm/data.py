"""Training images: loaded once as one uint8 tensor, then batched by a stateless indexer.

A data set that fits (app/spec_size.py::dataset_on_device) lives on the training device as uint8
(a quarter of float32's memory); a batch is gathered by indexing there (`DeviceBatches`), so no
image crosses the bus per step. A larger one stays in host memory (a user's data set: its decoded
array, memory-mapped) and each step's batch is gathered there and copied over one step ahead
(`HostBatches`). Both take the same images for a step: the indexer's, a pure function of
(seed, step), so resuming at any step needs no loader state.

A `folder` data set is the images that really lie in its folder: a file whose real path (symlinks
followed) leads out of the folder refuses the whole data set. The worker has already confined the
folder to the data roots (app/jobs/data_roots.py), so every file read lies inside them too.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.spec import FOLDER_IMAGE_SUFFIXES as IMAGE_SUFFIXES
from app.spec import DatasetSpec
from worker.ddpm.pixels import RESAMPLE, fit_image, resize_image

__all__ = [
    "RESAMPLE",
    "BatchIndexer",
    "DatasetError",
    "DeviceBatches",
    "HostBatches",
    "load_images",
    "to_model_range",
    "to_uint8",
]


class DatasetError(Exception):
    """The data set cannot be loaded; the message names the path and the reason."""


def load_images(spec: DatasetSpec, images_file: Path | None = None) -> torch.Tensor:
    """All images of the data set as uint8 of shape (N, C, H, W), H = W = image_size, C = channels,
    on the host. A `dataset` (one of a user's, POST /v1/datasets) is its decoded array
    `images_file` (worker/datasets/cache.py), memory-mapped: nothing is read until it is used."""
    if images_file is not None and spec.kind != "dataset":
        raise DatasetError(f"an images file ({images_file}) is only for dataset.kind 'dataset', not {spec.kind!r}")
    if spec.kind == "digits":
        return _load_digits(spec.image_size, spec.channels)
    if spec.kind == "folder":
        assert spec.path is not None  # enforced by DatasetSpec
        return _load_folder(Path(spec.path), spec.image_size, spec.channels)
    if spec.kind == "dataset":
        if images_file is None:
            raise DatasetError(
                f"data set {spec.id} is trained from its decoded images file, which the service's worker "
                "fetches; submit the job to the service (ddpm submit), or give ddpm-train --images FILE.npy"
            )
        return _load_array(Path(images_file), spec.image_size, spec.channels)
    raise ValueError(f"unknown dataset kind {spec.kind!r}; expected 'digits', 'folder' or 'dataset'")


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
    images = [resize_image(Image.fromarray(p), image_size, channels) for p in pixels]
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
                images.append(fit_image(img, image_size, channels))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"cannot read image {file} in dataset folder {root}: {e}") from e
    return torch.from_numpy(np.stack(images))  # (N, C, H, W)


def _load_array(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """The decoded array of a user's data set, memory-mapped copy-on-write: pages are read from the
    file as batches touch them, and a write (there is none) could never reach the file."""
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"cannot read the training images {path}: {e}") from e
    expected = (channels, image_size, image_size)
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != expected:
        found = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else "not one array"
        raise DatasetError(
            f"training images {path} hold {found}; expected uint8 (N, {channels}, {image_size}, {image_size}) "
            f"for dataset.image_size={image_size}, channels={channels}"
        )
    if len(array) == 0:
        raise DatasetError(f"training images {path} hold no image")
    return torch.from_numpy(array)  # (N, C, H, W) uint8, backed by the file


def _refuse_if_outside(file: Path, root: Path, real_root: Path) -> None:
    """DatasetError when `file` is a link (or lies in a linked folder) leading out of the data set's
    folder: it could expose any file the worker can read, outside the data roots."""
    real = file.resolve()
    if not real.is_relative_to(real_root):
        raise DatasetError(
            f"image {file} in dataset folder {root} resolves to {real}, outside the folder; "
            "a folder data set may only link to files inside it"
        )


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


Select = Callable[[torch.Tensor], torch.Tensor]  # the part of a global batch this process keeps (Ranks.share)


def _whole(batch: torch.Tensor) -> torch.Tensor:
    return batch


class DeviceBatches:
    """The training set on the device; a step's batch is an index gather there."""

    def __init__(self, images: torch.Tensor, indexer: BatchIndexer, select: Select = _whole) -> None:
        self.images, self.indexer, self.select = images, indexer, select  # images: (N, C, H, W) uint8 on the device

    def batch(self, step: int) -> torch.Tensor:
        """The images of 0-based step `step` (this process's share): (B/k, C, H, W) uint8 on the device."""
        return self.images[self.select(self.indexer.indices(step))]

    def close(self) -> None:
        pass


class HostBatches:
    """The training set in host memory; each step's batch gathered there and moved to the device
    one step ahead, so a step never waits for the host.

    CUDA: the batch of step s+1 is gathered into one of two pinned buffers while step s trains, and
    copied (non_blocking, on a side stream) into one of two device buffers. Two events order it:
    the copy into a device buffer waits until the training stream has queued everything that reads
    the batch it replaces, and the training stream waits for the copy before it reads. CPU: a
    background thread gathers step s+1 while step s trains. Either way the images of a step are
    `images[select(indexer.indices(step))]`, exactly those `DeviceBatches` takes.
    """

    def __init__(self, images: torch.Tensor, indexer: BatchIndexer, dev: torch.device, select: Select = _whole) -> None:
        if images.device.type != "cpu" or indexer.device.type != "cpu":
            raise ValueError("HostBatches gathers from a host tensor with host indices")
        self.images, self.indexer, self.dev, self.select = images, indexer, dev, select  # images: (N, C, H, W) uint8
        self._ahead: int | None = None  # the step already on its way
        if dev.type == "cuda":
            shape = (len(select(indexer.indices(0))), *images.shape[1:])  # (B/k, C, H, W)
            self._pinned = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
            self._buffers = [torch.empty(shape, dtype=torch.uint8, device=dev) for _ in range(2)]
            self._copied = [torch.cuda.Event() for _ in range(2)]  # the copy into _buffers[i] is done
            self._read = torch.cuda.Event()  # the training stream has queued all reads of the batch replaced
            self._stream = torch.cuda.Stream(dev)
        else:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-batches")
            self._next: Future[torch.Tensor] | None = None

    def batch(self, step: int) -> torch.Tensor:
        """The images of 0-based step `step` (this process's share): (B/k, C, H, W) uint8 on the device."""
        if self.dev.type == "cuda":
            return self._cuda_batch(step)
        if self._next is None or self._ahead != step:  # the first step, or not the one gathered ahead
            self._next = self._pool.submit(self._gather, step)
        batch = self._next.result()
        self._next, self._ahead = self._pool.submit(self._gather, step + 1), step + 1
        return batch

    def close(self) -> None:
        """Let a gather still running finish (it reads the images: they must outlive it)."""
        if self.dev.type != "cuda":
            self._pool.shutdown(wait=True)

    def _gather(self, step: int) -> torch.Tensor:
        return torch.index_select(self.images, 0, self.select(self.indexer.indices(step)))  # (B/k, C, H, W)

    def _cuda_batch(self, step: int) -> torch.Tensor:
        if self._ahead != step:  # the first step, or not the one copied ahead
            self._copy_ahead(step)
        slot = step % 2
        torch.cuda.current_stream(self.dev).wait_event(self._copied[slot])  # no host wait: the stream waits
        self._copy_ahead(step + 1)
        return self._buffers[slot]

    def _copy_ahead(self, step: int) -> None:
        slot = step % 2
        # SYNC: the copy out of this pinned buffer, queued two steps ago, must be done before it is
        # refilled. It waits only while the host is more than about two steps ahead of the GPU, which
        # then still has those steps queued: the GPU never waits for it.
        self._copied[slot].synchronize()
        torch.index_select(self.images, 0, self.select(self.indexer.indices(step)), out=self._pinned[slot])
        self._read.record(torch.cuda.current_stream(self.dev))  # the last reads of _buffers[slot] are queued before
        self._stream.wait_event(self._read)
        with torch.cuda.stream(self._stream):
            self._buffers[slot].copy_(self._pinned[slot], non_blocking=True)
        self._copied[slot].record(self._stream)
        self._ahead = step
