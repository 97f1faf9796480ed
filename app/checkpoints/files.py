"""Serving stored files: found through a database row, checked against the row's sha256 before a
byte goes out (410 when missing or damaged), ETag = the sha256, Range honoured.

Local storage: a FileResponse (Starlette answers Range). S3 storage: the object's size and stored
sha256 are checked with a HEAD, then either its bytes stream through the API (one `bytes=a-b`
range forwarded to S3) or, with DDPM_S3_DOWNLOAD=redirect, a 307 sends the client to a
presigned URL.
"""

from __future__ import annotations

import re

from fastapi import HTTPException, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from app.checkpoints.store import CheckpointFileError, CheckpointStore, LocalStore, S3Store, StorageUnavailable

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def checkpoint_store(request: Request) -> CheckpointStore:
    return request.app.state.checkpoint_store


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) bytes of a single `Range: bytes=a-b` header; None to send the
    whole file (no header, or one this server does not honour: several ranges, another unit).
    HTTP 416 when the range lies outside the file."""
    match = _RANGE.match(header.strip()) if header else None
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first and last and int(last) < int(first):
        return None  # not a valid range: ignored, as RFC 9110 asks
    if first == "":  # the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start > end or start >= size:
        detail = f"range {header} lies outside the file ({size} bytes)"
        raise HTTPException(416, detail=detail, headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _attachment(filename: str) -> str:
    return f'attachment; filename="{filename}"'


def _s3_response(
    request: Request,
    store: S3Store,
    key: str,
    sha256: str,
    *,
    media_type: str,
    size_bytes: int | None,
    filename: str | None,
) -> Response:
    found = store.verified_head(key, sha256, size_bytes)
    if store.download_mode == "redirect":
        return RedirectResponse(store.presigned_url(key, media_type=media_type, filename=filename), status_code=307)
    headers = {"ETag": f'"{sha256}"', "X-Checksum-SHA256": sha256, "Accept-Ranges": "bytes"}
    if filename:
        headers["Content-Disposition"] = _attachment(filename)
    wanted = byte_range(request.headers.get("range"), found.size_bytes)
    if wanted is None:
        headers["Content-Length"] = str(found.size_bytes)
        return StreamingResponse(store.read(key, sha256), media_type=media_type, headers=headers)
    start, end = wanted
    headers["Content-Range"] = f"bytes {start}-{end}/{found.size_bytes}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(store.read(key, sha256, wanted), status_code=206, media_type=media_type, headers=headers)


def verified_file_response(
    request: Request,
    relative: str,
    sha256: str,
    *,
    media_type: str,
    size_bytes: int | None = None,
    filename: str | None = None,
) -> Response:
    """The file a row points at, once it matches the row; HTTP 410 otherwise (503 if S3 is away)."""
    store = checkpoint_store(request)
    try:
        if isinstance(store, S3Store):
            return _s3_response(
                request, store, relative, sha256, media_type=media_type, size_bytes=size_bytes, filename=filename
            )
        assert isinstance(store, LocalStore)
        path = store.verified_path(relative, size_bytes, sha256)
    except CheckpointFileError as exc:
        raise HTTPException(410, detail=str(exc)) from exc
    except StorageUnavailable as exc:
        raise HTTPException(503, detail=str(exc)) from exc
    return FileResponse(
        path,
        media_type=media_type,
        filename=filename,
        headers={"ETag": f'"{sha256}"', "X-Checksum-SHA256": sha256},
    )
