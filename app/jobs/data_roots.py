"""Confinement of `folder` data sets to the configured data roots (DDPM_DATA_ROOTS).

Checked by the API before a job is queued and again by the worker before it reads a file, since
a symlink can change in between. A relative path is relative to the first root. The files inside
the folder are confined to it (and so to the roots) where they are read, in worker/ddpm/data.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePath


class DatasetPathRefused(ValueError):
    pass


def resolve_dataset_folder(path: str, roots: Sequence[Path]) -> Path:
    """The real location of `path` (symlinks followed); DatasetPathRefused unless it lies under
    one of `roots`. The folder need not exist yet (the API may not see the workers' files)."""
    if not roots:
        raise DatasetPathRefused("no data roots are configured (DDPM_DATA_ROOTS); folder data sets are disabled")
    if "\0" in path:
        raise DatasetPathRefused("dataset.path contains a NUL character")
    if ".." in PurePath(path).parts:
        raise DatasetPathRefused(f"dataset.path {path!r} contains '..'; give a path under a data root")
    real_roots = [root.resolve() for root in roots]
    resolved = (real_roots[0] / path).resolve()  # an absolute `path` replaces the root
    if not any(resolved.is_relative_to(root) for root in real_roots):
        allowed = ", ".join(str(r) for r in real_roots)
        raise DatasetPathRefused(
            f"dataset.path {path!r} resolves to {resolved}, which is outside the data roots ({allowed})"
        )
    return resolved
