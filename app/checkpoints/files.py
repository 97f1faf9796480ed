"""Serving stored files: found through a database row, checked against the row's sha256 before a
byte goes out (410 when missing or damaged), ETag = the sha256.

One implementation for both stores (RFC 9110 §13–14): `If-None-Match` with the ETag is a 304;
a single `bytes` range is a 206 (`If-Range` with the ETag keeps it, anything else asks for the
whole file); a valid range that lies outside the file is a 416; a Range this server does not
honour (bad syntax, another unit, several ranges) is ignored: 200 with the whole file. The bytes
come from the store's `read`, so the request's database session is closed before they flow.
With DDPM_S3_DOWNLOAD=redirect, a 307 sends the client to a presigned URL instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from starlette.datastructures import Headers

from app.checkpoints.store import (
    CheckpointFileError,
    CheckpointStore,
    S3Store,
    StorageUnavailable,
    StoredObject,
    file_blocks,
)

_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)  # one range; the unit is case-insensitive
_ENTITY_TAG = re.compile(r'(?:W/)?"([^"]*)"')

# What every file route may answer besides its 200 (for the OpenAPI document).
CONDITIONAL_RESPONSES: dict[int | str, dict[str, Any]] = {
    206: {"description": "The bytes a single `bytes` Range asked for"},
    304: {"description": "If-None-Match named the current ETag: the file is unchanged"},
    416: {"description": "The Range lies outside the file; Content-Range says its size"},
}


def checkpoint_store(request: Request) -> CheckpointStore:
    return request.app.state.checkpoint_store


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) bytes of a single `Range: bytes=a-b` header; None to send the
    whole file (no header, or one ignored: bad syntax, another unit, several ranges, last < first).
    HTTP 416 when a valid range lies outside the file."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or size == 0:  # nothing of an empty file can be cut out: it is sent whole
        return None
    first, last = match.groups()
    if first:
        if last and int(last) < int(first):
            return None  # not a valid range: ignored (RFC 9110 §14.1.1)
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    elif last:  # the last N bytes (`bytes=-0`: none of them, unsatisfiable)
        start, end = max(size - int(last), 0), size - 1
    else:
        return None  # `bytes=-`
    if start > end:
        detail = f"range {header} lies outside the file ({size} bytes)"
        raise HTTPException(416, detail=detail, headers={"Content-Range": f"bytes */{size}"})
    return start, end


def not_modified(headers: Headers, etag: str) -> bool:
    """If-None-Match names the ETag (weak comparison, RFC 9110 §13.1.2) or is `*`."""
    wanted = headers.get("if-none-match")
    if wanted is None:
        return False
    return wanted.strip() == "*" or f'"{etag}"' in {f'"{tag}"' for tag in _ENTITY_TAG.findall(wanted)}


def wanted_range(headers: Headers, size: int, etag: str) -> tuple[int, int] | None:
    """The range to send, None for the whole file. If-Range keeps the range only when it is the
    current ETag, strongly compared (§13.1.5); a date never matches: no Last-Modified is sent."""
    if_range = headers.get("if-range")
    if if_range is not None and if_range.strip() != f'"{etag}"':
        return None
    return byte_range(headers.get("range"), size)


def _attachment(filename: str) -> str:
    return f'attachment; filename="{filename}"'


def _stored_file_response(
    request: Request, store: CheckpointStore, key: str, found: StoredObject, sha256: str, media_type: str
) -> Response:
    """The file's bytes as the request's conditions and Range ask (200, 206, 304 or 416)."""
    headers = {"ETag": f'"{sha256}"', "X-Checksum-SHA256": sha256, "Accept-Ranges": "bytes"}
    if not_modified(request.headers, sha256):
        return Response(status_code=304, headers={"ETag": headers["ETag"]})
    size = found.size_bytes
    wanted = wanted_range(request.headers, size, sha256)
    if wanted is None:
        headers["Content-Length"] = str(size)
        return StreamingResponse(store.read(key, sha256), media_type=media_type, headers=headers)
    start, end = wanted
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(store.read(key, sha256, wanted), status_code=206, media_type=media_type, headers=headers)


def verified_file_response(
    request: Request,
    key: str,
    sha256: str,
    *,
    media_type: str,
    size_bytes: int | None = None,
    filename: str | None = None,
) -> Response:
    """The file a row points at, once it matches the row; HTTP 410 otherwise (503 if S3 is away)."""
    store = checkpoint_store(request)
    try:
        found = store.verified_head(key, sha256, size_bytes)
        if isinstance(store, S3Store) and store.download_mode == "redirect":
            url = store.presigned_url(key, media_type=media_type, filename=filename)
            return RedirectResponse(url, status_code=307)
        response = _stored_file_response(request, store, key, found, sha256, media_type)
    except CheckpointFileError as exc:
        raise HTTPException(410, detail=str(exc)) from exc
    except StorageUnavailable as exc:
        raise HTTPException(503, detail=str(exc)) from exc
    if filename and response.status_code != 304:
        response.headers["Content-Disposition"] = _attachment(filename)
    return response


def temporary_file_response(path: Path, *, media_type: str, filename: str) -> StreamingResponse:
    """A file made for this one request (an export), sent whole and then deleted. Range is not
    honoured: the next request makes another file, so no two requests' bytes line up."""

    def chunks() -> Iterator[bytes]:
        try:
            with path.open("rb") as file:
                yield from file_blocks(file, 0, path.stat().st_size)
        finally:
            path.unlink(missing_ok=True)

    headers = {"Content-Length": str(path.stat().st_size), "Content-Disposition": _attachment(filename)}
    return StreamingResponse(chunks(), media_type=media_type, headers=headers)
