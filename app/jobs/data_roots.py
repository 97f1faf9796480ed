"""Confinement of `folder` data sets to the configured data roots (DDPM_DATA_ROOTS).

Checked by the API before a job is queued and again by the worker before it reads a file, since
a symlink can change in between. A relative path is relative to the first root. The files inside
the folder are confined to it (and so to the roots) where they are read, in worker/ddpm/data.py.
Where the API sees the data (DDPM_DATASET_FOLDER_CHECK), it also refuses a folder that is not
there or holds no image, so the mistake is a 422 at submit rather than a failed job later.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Literal

from app.spec import FOLDER_IMAGE_SUFFIXES


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


def check_dataset_folder(path: str, roots: Sequence[Path], when: Literal["auto", "always", "never"]) -> Path:
    """`resolve_dataset_folder`, and unless `when` is "never" (or "auto" and the root the folder
    lies under is not on this host) DatasetPathRefused when the folder is missing, is not a
    directory, or holds no image the worker would read."""
    folder = resolve_dataset_folder(path, roots)
    root = next(r.resolve() for r in roots if folder.is_relative_to(r.resolve()))
    if when == "never" or (when == "auto" and not root.is_dir()):
        return folder
    where = f"dataset.path {path!r} ({folder})"
    if not folder.exists():
        raise DatasetPathRefused(f"{where} does not exist; put the images there first, or fix the path")
    if not folder.is_dir():
        raise DatasetPathRefused(f"{where} is not a directory; give the folder that holds the images")
    try:  # stops at the first image: a large data set is not walked at submit
        has_image = any(p.suffix.lower() in FOLDER_IMAGE_SUFFIXES and p.is_file() for p in folder.rglob("*"))
    except OSError as exc:
        raise DatasetPathRefused(f"{where} cannot be read: {exc}") from exc
    if not has_image:
        suffixes = "/".join(sorted(FOLDER_IMAGE_SUFFIXES))
        raise DatasetPathRefused(f"{where} holds no {suffixes} image (subfolders included)")
    return folder
