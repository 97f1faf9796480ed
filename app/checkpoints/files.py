"""Serving files under the checkpoint root: found through a database row, checked against the
row's sha256 before a byte goes out (410 when missing or damaged), ETag = the sha256."""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException, Request
from fastapi.responses import FileResponse

from app.checkpoints.store import CheckpointFileError, CheckpointStore


def verified_file(request: Request, relative: str, sha256: str, size_bytes: int | None = None) -> Path:
    """The file a row points at, once it matches the row; HTTP 410 otherwise."""
    store: CheckpointStore = request.app.state.checkpoint_store
    try:
        if size_bytes is None:  # rows that record no size: the sha256 still decides
            size_bytes = store.resolve(relative).stat().st_size
        return store.verified_path(relative, size_bytes, sha256)
    except (CheckpointFileError, FileNotFoundError) as exc:
        detail = str(exc) if isinstance(exc, CheckpointFileError) else f"file {relative} is missing from storage"
        raise HTTPException(410, detail=detail) from exc


def verified_file_response(
    request: Request,
    relative: str,
    sha256: str,
    *,
    media_type: str,
    size_bytes: int | None = None,
    filename: str | None = None,
) -> FileResponse:
    path = verified_file(request, relative, sha256, size_bytes)
    return FileResponse(
        path,
        media_type=media_type,
        filename=filename,
        headers={"ETag": f'"{sha256}"', "X-Checksum-SHA256": sha256},
    )
