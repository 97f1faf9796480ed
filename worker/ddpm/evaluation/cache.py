"""Where evaluation keeps what it computes once: reference statistics and the digits classifier.

A cache holds bytes by name; names are relative and '/'-separated (`reference/<key>.npz`,
`networks/digits-classifier-v1.pt`). A miss is None: whatever was cached can be computed again,
so a cache that loses a file costs time, never a result. No torch here: the worker builds its
`EvaluationSetup` without loading the ML stack.

Implementations: `FolderCache` (a local directory: ddpm-train, benchmarks), `MemoryCache` (one
process: tests, a run without storage), and the worker's `StoreCache` (worker/evaluation_cache.py:
the checkpoint store, local or S3, shared by every worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

from app.files import atomic_write


class EvaluationCache(Protocol):
    """Bytes by relative, '/'-separated name."""

    def load(self, name: str) -> bytes | None: ...

    def save(self, name: str, data: bytes) -> None: ...


def checked_name(name: str) -> PurePosixPath:
    """`name` as a relative path that stays inside the cache: ValueError for an absolute name,
    an empty one or one with a '..' part (a cache must never read or write outside its root)."""
    path = PurePosixPath(name)
    if path.is_absolute() or not path.parts or ".." in path.parts or "\\" in name:
        raise ValueError(f"evaluation cache name {name!r} must be relative, '/'-separated, without '..'")
    return path


class FolderCache:
    """Files under `root`, written atomically (a reader sees the old file or the whole new one)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root.joinpath(*checked_name(name).parts)

    def load(self, name: str) -> bytes | None:
        path = self.path(name)
        return path.read_bytes() if path.is_file() else None

    def save(self, name: str, data: bytes) -> None:
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)


@dataclass
class MemoryCache:
    """A dict: what one process computed, forgotten when it ends."""

    files: dict[str, bytes] = field(default_factory=dict)

    def load(self, name: str) -> bytes | None:
        return self.files.get(str(checked_name(name)))

    def save(self, name: str, data: bytes) -> None:
        self.files[str(checked_name(name))] = bytes(data)


@dataclass(frozen=True)
class EvaluationSetup:
    """What a run's evaluation needs from outside the spec: its cache and the Inception weights.

    `fid_weights` is the Inception TorchScript file (DDPM_FID_WEIGHTS), used only when its sha256
    is `fid_weights_sha256` (DDPM_FID_WEIGHTS_SHA256); without both, a job on anything but the
    digits set trains without evaluation (it says why, once)."""

    cache: EvaluationCache
    fid_weights: Path | None = None
    fid_weights_sha256: str = ""
