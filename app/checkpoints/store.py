"""Checkpoint files on the local checkpoint root: path confinement and integrity checks.

Paths in the database are relative to the root; a resolved path must stay under it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path


class CheckpointFileError(Exception):
    """The file a checkpoint row points at is missing, outside the root or damaged."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class CheckpointStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        # (path, size, mtime_ns) -> sha256 already verified, so repeated and Range downloads
        # of an unchanged file are not re-hashed.
        self._verified: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise CheckpointFileError(f"checkpoint path {relative!r} leaves the checkpoint root")
        return path

    def verified_path(self, relative: str, size_bytes: int, sha256: str) -> Path:
        """The file, once its size and sha256 match the row; CheckpointFileError otherwise."""
        path = self.resolve(relative)
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise CheckpointFileError(f"checkpoint file {relative} is missing from storage") from exc
        if st.st_size != size_bytes:
            raise CheckpointFileError(
                f"checkpoint file {relative} is damaged: {st.st_size} bytes on disk, {size_bytes} recorded"
            )
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._verified.get(key)
        if known is None:
            known = sha256_file(path)
            with self._lock:
                self._verified[key] = known
        if known != sha256:
            raise CheckpointFileError(f"checkpoint file {relative} is damaged: its sha256 does not match the record")
        return path

    def delete(self, relative: str) -> None:
        path = self.resolve(relative)
        path.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
