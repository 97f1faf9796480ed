"""Receiving an upload's bytes: streamed to the part file (`checkpoint_root / archive_key`) a
batch at a time on a thread, hashed (sha256) on the way, never held whole in memory, and with no
database connection held while they flow (each step is its own short `session_scope`).

The part file is the truth about an upload's progress: a PATCH continues at its size (after a
crash too), under an exclusive `flock` so that two requests never append to one upload at once.
A client that goes away mid-body leaves the data set `uploading` with `received_bytes` = the
bytes on disk, to be resumed with PATCH.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from app.checkpoints.store import CheckpointStore
from app.datasets import service
from app.datasets.keys import ArchiveFormat
from app.datasets.service import Allowance, DatasetConflict
from app.db import session_scope
from app.jobs.limits import SpecRefused
from app.models import Dataset
from app.queue import Sender

# Content types of a raw archive body, and the format each means.
ARCHIVE_TYPES: dict[str, ArchiveFormat] = {
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
    "application/x-tar": "tar",
    "application/gzip": "tar.gz",
    "application/x-gzip": "tar.gz",
    "application/x-compressed-tar": "tar.gz",
    "application/x-gtar": "tar.gz",
}
MULTIPART = "multipart/form-data"
JSON = "application/json"
ACCEPTED_TYPES = (*ARCHIVE_TYPES, MULTIPART, JSON)
_SUFFIXES: tuple[tuple[str, ArchiveFormat], ...] = (
    (".tar.gz", "tar.gz"),
    (".tgz", "tar.gz"),
    (".zip", "zip"),
    (".tar", "tar"),
)

WRITE_BATCH = 1 << 20  # bytes gathered before one write (on a thread)
PROGRESS_EVERY_S = 10.0  # received_bytes (and the sweeper's sign of life) at most this stale
MULTIPART_SLACK = 1 << 20  # what a form may carry besides the archive (boundaries, headers, name)
_MAX_PART_HEADERS = 16 * 1024
_NAME_MAX = 200

# The routes whose bodies are uploads (app/server.py: an idle deadline per chunk instead of one
# for the whole body; app/datasets/endpoints.py: no general body-size limit).
_UPLOAD_ROUTES = (("POST", re.compile(r"/v1/datasets/?")), ("PATCH", re.compile(r"/v1/datasets/[^/]+/upload/?")))

T = TypeVar("T")


def is_upload_request(method: str, path: str) -> bool:
    return any(method == m and pattern.fullmatch(path) for m, pattern in _UPLOAD_ROUTES)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def format_of_part(content_type: str, filename: str | None) -> ArchiveFormat | None:
    """A form's file part: its format by Content-Type, else by its filename's extension."""
    found = ARCHIVE_TYPES.get(media_type(content_type))
    if found is None and filename:
        found = next((fmt for suffix, fmt in _SUFFIXES if filename.lower().endswith(suffix)), None)
    return found


def upload_refused(loc: tuple[str, ...], msg: str, value: Any = None) -> SpecRefused:
    return SpecRefused([{"type": "value_error", "loc": list(loc), "msg": msg, "input": value}])


async def in_session(factory: sessionmaker[Session], fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(session, *args, **kwargs)` in its own unit of work, on a thread: committed when it returns."""

    def scoped() -> T:
        with session_scope(factory) as session:
            return fn(session, *args, **kwargs)

    return await run_in_threadpool(scoped)


class PartFile:
    """The upload's bytes on disk, appended to under an exclusive lock, hashed as they go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DatasetConflict("another request is sending this upload's bytes now; retry once it ends") from exc
            raise
        self.size = os.fstat(self._fd).st_size
        self._digest = hashlib.sha256()
        with path.open("rb") as stored:  # a resumed upload: the stored prefix, hashed again
            while block := stored.read(WRITE_BATCH):
                self._digest.update(block)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._digest.update(data)
        self.size += len(data)

    def sync(self) -> None:
        os.fsync(self._fd)

    def sha256(self) -> str:
        return self._digest.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # and the lock with it
            self._fd = -1


class Sink:
    """Where one request's bytes go: checked against the upload's allowance before they are
    kept (413/429 past it), gathered into batches written on a thread, and the row's progress
    recorded every PROGRESS_EVERY_S."""

    def __init__(
        self, factory: sessionmaker[Session], dataset_id: uuid.UUID, part: PartFile, allowed: Allowance
    ) -> None:
        self.factory = factory
        self.dataset_id = dataset_id
        self.part = part
        self.allowed = allowed
        self._batch = bytearray()
        self._recorded_at = time.monotonic()

    @property
    def received(self) -> int:
        return self.part.size + len(self._batch)

    async def add(self, data: bytes) -> None:
        self.allowed.check(self.received + len(data))
        self._batch += data
        if len(self._batch) >= WRITE_BATCH:
            await self.flush()
        if time.monotonic() - self._recorded_at >= PROGRESS_EVERY_S:
            await self.record()

    async def flush(self) -> None:
        if self._batch:
            data, self._batch = bytes(self._batch), bytearray()
            await run_in_threadpool(self.part.write, data)

    async def record(self) -> None:
        await self.flush()
        self._recorded_at = time.monotonic()
        if not await in_session(self.factory, service.record_progress, self.dataset_id, self.part.size):
            raise DatasetConflict(f"data set {self.dataset_id} was deleted or completed while its bytes arrived")


async def receive(chunks: AsyncIterator[bytes], sink: Sink) -> bool:
    """Every byte of the body into the sink; False when the client went away before its end."""
    try:
        async for chunk in chunks:
            if chunk:
                await sink.add(chunk)
    except ClientDisconnect:
        await sink.flush()
        return False
    await sink.flush()
    return True


async def finish(
    factory: sessionmaker[Session],
    store: CheckpointStore,
    dispatcher: Sender,
    sink: Sink,
    *,
    complete: bool,
    upload_length: int | None,
    name: str | None = None,
) -> Dataset:
    """The request's bytes are on disk: record how many, or (complete) make the archive the
    store's and mark the data set preparing (the prepare task goes out after that commit).
    Complete with fewer bytes than Upload-Length declared: 409 with the offset to continue at."""
    size = sink.part.size
    if complete and size == 0:
        await discard(factory, store, sink.dataset_id)
        raise upload_refused(("body",), "the archive is empty: send its bytes")
    if not complete or (upload_length is not None and size != upload_length):
        await sink.record()
        if complete:
            raise DatasetConflict(
                f"the upload ended at {size} bytes, but Upload-Length declared {upload_length}: "
                f"send the rest with PATCH and Upload-Offset: {size}",
                offset=size,
            )
        return await in_session(factory, service.dataset_by_id, sink.dataset_id)
    await run_in_threadpool(sink.part.sync)
    sha256 = sink.part.sha256()
    key = await run_in_threadpool(store.publish, sink.part.path, sha256)
    dataset = await in_session(factory, service.complete_upload, dispatcher, sink.dataset_id, size, sha256, name)
    await run_in_threadpool(store.discard_scratch, key)
    return dataset


async def discard(factory: sessionmaker[Session], store: CheckpointStore, dataset_id: uuid.UUID) -> None:
    """An upload refused mid-way: its row and bytes go."""
    key = await in_session(factory, service.discard_upload, dataset_id)
    if key is not None:
        await run_in_threadpool(store.delete, key)


class FormReader:
    """A multipart/form-data body, parsed as it streams (python-multipart's parser): the `file`
    part's bytes go to the upload as they arrive, `name` is read (at most 200 characters), other
    fields are skipped. The parser's callbacks only note what they saw; `events` are acted on
    (a row created, bytes written) between chunks, so nothing waits inside a callback."""

    def __init__(self, content_type: str) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary or len(boundary) > 200:
            raise upload_refused(("header", "content-type"), "multipart/form-data needs a boundary parameter")
        self.events: list[tuple[str, Any]] = []
        self.ended = False
        self._field, self._value = b"", b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda d, s, e: self._header_piece("field", d[s:e]),
                "on_header_value": lambda d, s, e: self._header_piece("value", d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": lambda: self.events.append(("headers", dict(self._headers))),
                "on_part_data": lambda d, s, e: self.events.append(("data", bytes(d[s:e]))),
                "on_part_end": lambda: self.events.append(("end", None)),
                "on_end": self._end,
            },
        )

    def _begin(self) -> None:
        self._headers, self._header_bytes = {}, 0

    def _end(self) -> None:
        self.ended = True

    def _header_piece(self, which: str, data: bytes) -> None:
        self._header_bytes += len(data)
        if self._header_bytes > _MAX_PART_HEADERS:
            raise MultipartParseError(f"a part's headers are over {_MAX_PART_HEADERS} bytes")
        if which == "field":
            self._field += data
        else:
            self._value += data

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field, self._value = b"", b""

    def feed(self, chunk: bytes) -> list[tuple[str, Any]]:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise upload_refused(("body",), f"not a valid multipart/form-data body: {exc}") from None
        events, self.events = self.events, []
        return events


def part_of(headers: dict[str, str]) -> tuple[str, str | None]:
    """A form part's field name and filename, from its Content-Disposition."""
    _, params = parse_options_header(headers.get("content-disposition", ""))
    filename = params.get(b"filename")
    return params.get(b"name", b"").decode("latin-1"), None if filename is None else filename.decode("latin-1")


def form_name(raw: bytes) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise upload_refused(("body", "name"), "must be UTF-8 text") from None
    if len(name) > _NAME_MAX or "\0" in name:
        raise upload_refused(("body", "name"), f"at most {_NAME_MAX} characters, no NUL")
    return name


class FormUpload:
    """A form's events acted on: the `file` part starts the upload (`start`, given its format
    and the name read so far) and its bytes go to the sink; `name` is kept for the end."""

    def __init__(self, reader: FormReader, start: Callable[[ArchiveFormat, str | None], Awaitable[Sink]]) -> None:
        self.reader = reader
        self.start = start
        self.sink: Sink | None = None
        self.name: str | None = None
        self._current: str | None = None
        self._name_raw = b""
        self._file_done = False

    async def run(self, chunks: AsyncIterator[bytes]) -> bool:
        """The whole body; False when the client went away before its end."""
        try:
            async for chunk in chunks:
                for kind, value in self.reader.feed(chunk):
                    await self._on(kind, value)
        except ClientDisconnect:
            if self.sink is not None:
                await self.sink.flush()
            return False
        if self.sink is not None:
            await self.sink.flush()
        if not self.reader.ended:
            raise upload_refused(("body",), "the multipart/form-data body ends before its closing boundary")
        if self.sink is None or not self._file_done:
            raise upload_refused(("body", "file"), "Field required: the archive, as a file part named `file`")
        return True

    async def _on(self, kind: str, value: Any) -> None:
        if kind == "headers":
            await self._part(value)
        elif kind == "data" and self._current == "file":
            assert self.sink is not None
            await self.sink.add(value)
        elif kind == "data" and self._current == "name":
            self._name_raw += value
            if len(self._name_raw) > 4 * _NAME_MAX:
                raise upload_refused(("body", "name"), f"at most {_NAME_MAX} characters")
        elif kind == "end":
            if self._current == "name":
                self.name = form_name(self._name_raw)
            self._file_done |= self._current == "file"
            self._current = None

    async def _part(self, headers: dict[str, str]) -> None:
        field, filename = part_of(headers)
        self._current = field if field in ("file", "name") else None
        if field == "name":
            self._name_raw = b""
        if field != "file":
            return
        if self.sink is not None:
            raise upload_refused(("body", "file"), "one archive per data set: the form has a second `file` part")
        fmt = format_of_part(headers.get("content-type", ""), filename)
        if fmt is None:
            raise upload_refused(
                ("body", "file"),
                "not an archive this service reads: give the part a Content-Type of "
                f"{', '.join(ARCHIVE_TYPES)} or a filename ending in .zip, .tar, .tar.gz or .tgz",
                filename,
            )
        self.sink = await self.start(fmt, self.name)
