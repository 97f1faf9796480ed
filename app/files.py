"""Crash-safe file writes and file checksums, one implementation for every part that writes files.

The checkpoint store (`app.checkpoints`), the ML core's checkpoint and sample files
(`worker.ddpm`) and the client's download (`app.client`) all use these. So that the client and
the ML core can, this module imports nothing but the standard library (no SQLAlchemy, no torch).

A crash-safe write (ARCHITECTURE.md invariant 3): the bytes go to a temporary file in the same
directory, which is flushed and fsynced, renamed over the target, and then the directory itself
is fsynced so that the rename survives a power cut. A crash leaves the old file or the whole new
one, never a mix; the temporary file never stays behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20


def sha256_file(path: Path | str, chunk_size: int = CHUNK_BYTES) -> str:
    """sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_directory(path: Path | str) -> None:
    """Make a rename or unlink in directory `path` durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def atomic_file(path: Path | str, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A file to write that replaces `path` (mode 0644) only when the block ends without an error.

    An exception in the block (a checksum that does not match, an interrupted download) removes
    the temporary file and leaves `path` as it was."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def atomic_write(path: Path | str, data: bytes) -> str:
    """Write `data` to `path` crash-safely (see `atomic_file`); the sha256 hex digest of `data`."""
    with atomic_file(path) as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()
