"""A prepared data set as a job trains on it: decoded once per image size, cached, shared.

`training_images` returns the local `.npy` (uint8 (N, C, S, S), np.save format) at
`store.root / cache_key(sha256, S, C)` (app/datasets/keys.py), the first way that works:

1. this host has it: used as it is;
2. the store has it (S3: another host decoded it; `resume_copy` downloads it and checks the sha256
   stored with the object): fetched;
3. else the prepared tar is fetched, checked against the data set's sha256, and decoded member by
   member (as worker/ddpm/pixels.py::fit_image fits every training image) into a memory-mapped
   temporary file beside the target, so no more than a few hundred images are ever held as Python
   objects; fsynced, renamed over the target, and published to the store.

The array is content-addressed (the prepared tar's sha256 and the size), so it needs no row. Two
builders on one host write their own temporary files and rename them atomically: the last rename
wins, with the same bytes. The scratch copy of a fetched tar (S3) goes once the array is built.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from app.checkpoints.store import CheckpointFileError, CheckpointStore
from app.datasets.keys import cache_key
from app.files import fsync_directory, sha256_file
from worker.ddpm.pixels import fit_image

log = logging.getLogger(__name__)

SHA256 = re.compile(r"[0-9a-f]{64}")  # the cache folder's name: nothing else may get into the path
DECODE_CHUNK = 256  # members read ahead and decoded in parallel (Pillow releases the GIL)
# A builder's temporary file untouched this long was left by a killed one (a live builder's writes
# keep its mtime fresh): removed by the next builder of the same array.
STALE_TEMPORARY_S = 3600.0


class TrainingImagesError(Exception):
    """The data set's images cannot be made ready for training; the message says why."""


def training_images(store: CheckpointStore, sha256: str, prepared_key: str, image_size: int, channels: int) -> Path:
    """The local decoded array of the prepared set `prepared_key` (content `sha256`) at this size;
    see the module docstring. TrainingImagesError when the prepared set is missing, damaged or does
    not decode; StorageUnavailable (the store did not answer) is left to the caller to retry."""
    if not SHA256.fullmatch(sha256):
        raise TrainingImagesError(f"the prepared data set {prepared_key} has no valid sha256 ({sha256!r})")
    key = cache_key(sha256, image_size, channels)
    target = store.resolve(key)
    if _is_array(target, image_size, channels):
        return target
    with contextlib.suppress(CheckpointFileError):  # not in the store (yet): decoded below
        fetched = store.resume_copy(key)
        if _is_array(fetched, image_size, channels):
            log.info("decoded images %s fetched from the store", key)
            return fetched
    tar = _prepared_tar(store, sha256, prepared_key)
    started = time.monotonic()
    count = _decode_into(tar, target, image_size, channels)
    store.publish(target)
    store.discard_scratch(prepared_key)
    log.info("decoded %d images of %s into %s in %.1fs", count, prepared_key, key, time.monotonic() - started)
    return target


def _is_array(path: Path, image_size: int, channels: int) -> bool:
    """Whether `path` is a whole decoded array of this size (its header read, not its pixels)."""
    if not path.is_file():
        return False
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return (
        isinstance(array, np.ndarray)
        and array.dtype == np.uint8
        and array.shape[1:] == (channels, image_size, image_size)
        and len(array) > 0
    )


def _prepared_tar(store: CheckpointStore, sha256: str, prepared_key: str) -> Path:
    """The prepared tar on this host, checked against the data set's sha256."""
    try:
        tar = store.resume_copy(prepared_key)
    except CheckpointFileError as exc:
        raise TrainingImagesError(f"the prepared data set {prepared_key} cannot be fetched: {exc}") from exc
    if not tar.is_file():
        raise TrainingImagesError(f"the prepared data set {prepared_key} is missing from storage")
    if sha256_file(tar) != sha256:
        raise TrainingImagesError(
            f"the prepared data set {prepared_key} is damaged: its sha256 does not match the data set's"
        )
    return tar


def _decode_into(tar_path: Path, target: Path, image_size: int, channels: int) -> int:
    """Decode every member of the prepared tar, in order, into a new array file at `target`
    (atomically: a temporary file beside it, fsynced and renamed). The number of images."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with _open_tar(tar_path) as tar:
            members = _image_members(tar, tar_path)
            out = np.lib.format.open_memmap(
                name, mode="w+", dtype=np.uint8, shape=(len(members), channels, image_size, image_size)
            )  # (N, C, S, S)
            for start, pixels in _decoded(tar, members, image_size, channels):
                out[start : start + len(pixels)] = pixels
            out.flush()
            del out  # unmapped before the rename
        with open(name, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(name, 0o644)
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)
    fsync_directory(target.parent)
    return len(members)


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary files of builders of `target` that were killed mid-way (kill -9, a power cut)."""
    cutoff = time.time() - STALE_TEMPORARY_S
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if leftover.stat().st_mtime < cutoff:
                log.info("removing %s, left by a builder that did not finish", leftover)
                leftover.unlink()


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """The prepared set, an uncompressed tar; a broken one is a TrainingImagesError naming it."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            yield tar
    except (tarfile.TarError, EOFError) as exc:
        raise TrainingImagesError(f"the prepared data set {path.name} is not a readable tar: {exc}") from exc


def _image_members(tar: tarfile.TarFile, path: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    odd = next((m.name for m in members if not m.isfile()), None)
    if odd is not None:
        raise TrainingImagesError(f"the prepared data set {path.name} holds {odd!r}, which is not a file")
    if not members:
        raise TrainingImagesError(f"the prepared data set {path.name} holds no image")
    # A tar cut short at a member's header reads as a shorter whole one: only the end-of-archive
    # marker (two zero blocks, where reading stopped) tells them apart.
    with path.open("rb") as f:
        f.seek(tar.offset)
        if f.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
            raise TrainingImagesError(f"the prepared data set {path.name} is cut short (no end-of-archive marker)")
    return members


def _decoded(
    tar: tarfile.TarFile, members: list[tarfile.TarInfo], image_size: int, channels: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the first, pixels (n, C, S, S)) for each run of DECODE_CHUNK members, decoded in parallel."""

    def decode(member: tarfile.TarInfo, data: bytes) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return fit_image(img, image_size, channels)  # (C, S, S)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise TrainingImagesError(f"image {member.name} of the prepared data set does not decode: {exc}") from exc

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="decode") as pool:
        for start in range(0, len(members), DECODE_CHUNK):
            chunk = members[start : start + DECODE_CHUNK]
            data = [_member_bytes(tar, member) for member in chunk]
            yield start, np.stack(list(pool.map(decode, chunk, data)))


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    file = tar.extractfile(member)
    assert file is not None  # a regular file (checked)
    with file:
        data = file.read()
    if len(data) != member.size:
        raise TrainingImagesError(f"image {member.name} of the prepared data set is cut short")
    return data
