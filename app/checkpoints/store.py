"""Where checkpoint files live: the local checkpoint root, or an S3-compatible bucket.

A file is named by its key, the path relative to the checkpoint root
(`<job-id>/attempt-3/step-00000500.safetensors`); rows in the database hold keys. Workers always
write into the local root first (atomic, fsynced, sha256 known). Then, in this order:

    publish(path)   the store holds the whole file (S3: uploaded, sha256 in its metadata)
    commit the row  the commit point (invariant 3): a row never names a file that is not whole
    discard_scratch S3 only: the local copy goes; the bucket holds the file from now on
    delete(key)     for superseded files, only after their rows are gone

LocalStore: the root is the store (publish and discard_scratch do nothing). S3Store: the root is
scratch space; a resume downloads into it, export and sampling read from temporary copies.
Downloads are the same on both: verified_head (size and sha256 against the row), then read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.files import fsync_directory, sha256_file

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)
_MB = 1 << 20


class CheckpointFileError(Exception):
    """The file a row points at is missing, outside the root or damaged."""


class StorageUnavailable(Exception):
    """The object store did not answer (or refused us): try again later."""


@dataclass(frozen=True)
class StoredObject:
    size_bytes: int
    sha256: str | None  # S3: from the object's metadata, as publish wrote it


def file_blocks(file: BinaryIO, start: int, length: int, chunk: int = _MB) -> Iterator[bytes]:
    """`length` bytes of an open file from `start` on, `chunk` at a time (fewer if it ends first)."""
    file.seek(start)
    while length > 0 and (block := file.read(min(chunk, length))):
        length -= len(block)
        yield block


def checked_chunks(key: str, blocks: Iterator[bytes], sha256: str | None, close: Callable[[], None]) -> Iterator[bytes]:
    """`blocks` for a streaming response, then `close()`. With a sha256 (a whole file), what is
    sent is hashed and the last block held back until the hash matches: a client may see a
    cut-short body, never a whole wrong one, whatever happened to the file since it was checked."""
    digest = hashlib.sha256()
    held = b""
    try:
        for block in blocks:
            if held:
                yield held
            digest.update(block)
            held = block
        if sha256 is not None and digest.hexdigest() != sha256:
            log.error("checkpoint file %s is damaged in storage: its bytes do not match the recorded sha256", key)
            raise CheckpointFileError(f"checkpoint file {key} is damaged: its bytes do not match the record")
        if held:
            yield held
    finally:
        close()


class CheckpointStore(ABC):
    """The local root (where workers write) and the operations every store offers by key."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.root))

    def resolve(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise CheckpointFileError(f"checkpoint path {relative!r} leaves the checkpoint root")
        return path

    @abstractmethod
    def publish(self, path: Path, sha256: str | None = None) -> str:
        """Make the whole local file `path` (under the root) the store's; return its key."""

    @abstractmethod
    def discard_scratch(self, key: str) -> None:
        """After the row naming `key` committed: drop the local copy if the store keeps its own."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the file (and any local copy); a missing one is not an error."""

    @abstractmethod
    def keys_under(self, prefix: str) -> set[str]:
        """Every key the store or this host's scratch holds under `prefix` (for garbage collection)."""

    @abstractmethod
    def local_copy(
        self, key: str, sha256: str, size_bytes: int | None = None
    ) -> contextlib.AbstractContextManager[Path]:
        """A local file with the row's size and sha256, for the `with` block; CheckpointFileError otherwise."""

    @abstractmethod
    def resume_copy(self, key: str) -> Path:
        """The file at its place under the root (`root / key`), fetched if this host lacks it."""

    @abstractmethod
    def verified_head(self, key: str, sha256: str, size_bytes: int | None = None) -> StoredObject:
        """The file's size and sha256, once they match the row; CheckpointFileError otherwise."""

    @abstractmethod
    def read(
        self, key: str, sha256: str, byte_range: tuple[int, int] | None = None, chunk: int = _MB
    ) -> Iterator[bytes]:
        """The file's bytes, or the inclusive `byte_range`, as an iterator for a streaming response
        (checked_chunks). The file is opened here, before the first byte is sent, so a missing
        file is still a 410."""


class LocalStore(CheckpointStore):
    """The checkpoint root is the store: single host, or a volume shared by API and workers."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        # (path, size, mtime_ns) -> sha256 already verified, so repeated and Range downloads
        # of an unchanged file are not re-hashed.
        self._verified: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def verified_path(self, relative: str, size_bytes: int | None, sha256: str) -> Path:
        """The file, once its size (when recorded) and sha256 match the row; CheckpointFileError otherwise."""
        path = self.resolve(relative)
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise CheckpointFileError(f"checkpoint file {relative} is missing from storage") from exc
        if size_bytes is not None and st.st_size != size_bytes:
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

    def publish(self, path: Path, sha256: str | None = None) -> str:
        return self.relative(path)  # written atomically under the root: already the store's

    def discard_scratch(self, key: str) -> None:
        pass  # the root is the store

    def delete(self, key: str) -> None:
        path = self.resolve(key)
        path.unlink(missing_ok=True)
        if path.parent.is_dir():
            fsync_directory(path.parent)

    def keys_under(self, prefix: str) -> set[str]:
        top = self.resolve(prefix)
        if not top.is_dir():
            return set()
        return {self.relative(path) for path in top.rglob("*") if path.is_file()}

    @contextlib.contextmanager
    def local_copy(self, key: str, sha256: str, size_bytes: int | None = None) -> Iterator[Path]:
        yield self.verified_path(key, size_bytes, sha256)

    def resume_copy(self, key: str) -> Path:
        return self.resolve(key)  # the trainer says so if it is missing

    def verified_head(self, key: str, sha256: str, size_bytes: int | None = None) -> StoredObject:
        return StoredObject(size_bytes=self.verified_path(key, size_bytes, sha256).stat().st_size, sha256=sha256)

    def read(
        self, key: str, sha256: str, byte_range: tuple[int, int] | None = None, chunk: int = _MB
    ) -> Iterator[bytes]:
        path = self.resolve(key)
        try:
            file = path.open("rb")
        except FileNotFoundError as exc:
            raise CheckpointFileError(f"checkpoint file {key} is missing from storage") from exc
        start, end = byte_range or (0, os.fstat(file.fileno()).st_size - 1)
        blocks = file_blocks(file, start, end - start + 1, chunk)
        return checked_chunks(key, blocks, None if byte_range else sha256, file.close)


def make_s3_client(settings: Settings):  # type: ignore[no-untyped-def]
    """A boto3 S3 client with the configured endpoint, region and keys (DDPM_S3_*): the store's,
    and the one a data set's s3:// source is read with. Thread-safe; one per user of it."""
    endpoint = settings.s3_endpoint_url or None
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=settings.s3_region,
        aws_access_key_id=settings.s3_access_key_id or None,
        aws_secret_access_key=settings.s3_secret_access_key.get_secret_value() or None,
        config=Config(
            signature_version="s3v4",
            # Path-style URLs for a custom endpoint (MinIO and friends rarely have wildcard DNS).
            s3={"addressing_style": "path"} if endpoint else {},
            retries={"mode": "standard", "max_attempts": 5},
        ),
    )


class S3Store(CheckpointStore):
    """An S3-compatible bucket; object key = prefix + key. The client is thread-safe (one per store)."""

    def __init__(self, root: Path, settings: Settings) -> None:
        super().__init__(root)
        self.bucket = settings.s3_bucket
        prefix = settings.s3_prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.client = make_s3_client(settings)
        threshold = settings.s3_multipart_threshold_mb * _MB
        # Parts are at least 8 MiB (S3 refuses parts under 5 MiB but the last).
        self.transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=max(threshold, 8 * _MB))
        self.download_mode = settings.s3_download
        self.presign_expires_s = settings.s3_presign_expires_s

    def object_key(self, key: str) -> str:
        if PurePosixPath(key).is_absolute() or ".." in PurePosixPath(key).parts:
            raise CheckpointFileError(f"checkpoint path {key!r} leaves the checkpoint root")
        return self.prefix + key

    def describe(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    @contextlib.contextmanager
    def _s3_errors(self, what: str) -> Iterator[None]:
        """A missing object becomes CheckpointFileError, any other failure StorageUnavailable."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in {"404", "NoSuchKey", "NotFound"}:
                raise CheckpointFileError(f"{what} is missing from storage") from exc
            code, message = error.get("Code"), error.get("Message")
            raise StorageUnavailable(f"{what}: S3 refused the request ({code}: {message})") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StorageUnavailable(f"{what}: S3 unavailable ({exc})") from exc

    # --- writing (workers) -----------------------------------------------------------------
    def publish(self, path: Path, sha256: str | None = None) -> str:
        key = self.relative(path)
        digest = sha256 or sha256_file(path)
        # upload_file: one PUT, or a multipart upload above the threshold; either way the object
        # appears only once it is whole. S3 checks each part's SHA-256 in transit.
        with self._s3_errors(f"uploading {self.describe(key)}"):
            self.client.upload_file(
                str(path),
                self.bucket,
                self.object_key(key),
                ExtraArgs={"Metadata": {"sha256": digest}, "ChecksumAlgorithm": "SHA256"},
                Config=self.transfer,
            )
        return key

    def discard_scratch(self, key: str) -> None:
        self.resolve(key).unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        with self._s3_errors(f"deleting {self.describe(key)}"):
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        self.discard_scratch(key)

    def keys_under(self, prefix: str) -> set[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.object_key(prefix)
        )
        with self._s3_errors(f"listing {self.describe(prefix)}"):
            keys = {item["Key"].removeprefix(self.prefix) for page in pages for item in page.get("Contents", [])}
        top = self.resolve(prefix)
        if top.is_dir():  # scratch files whose upload never happened (or whose discard did not)
            keys |= {self.relative(path) for path in top.rglob("*") if path.is_file()}
        return keys

    # --- reading ---------------------------------------------------------------------------
    def head(self, key: str) -> StoredObject:
        with self._s3_errors(f"checkpoint file {key}"):
            meta = self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        return StoredObject(size_bytes=meta["ContentLength"], sha256=meta.get("Metadata", {}).get("sha256"))

    def verified_head(self, key: str, sha256: str, size_bytes: int | None = None) -> StoredObject:
        found = self.head(key)
        if size_bytes is not None and found.size_bytes != size_bytes:
            raise CheckpointFileError(
                f"checkpoint file {key} is damaged: {found.size_bytes} bytes stored, {size_bytes} recorded"
            )
        if found.sha256 != sha256:
            raise CheckpointFileError(f"checkpoint file {key} is damaged: its sha256 does not match the record")
        return found

    def _download_verified(self, key: str, target: Path, expected: StoredObject) -> None:
        with self._s3_errors(f"checkpoint file {key}"):
            self.client.download_file(self.bucket, self.object_key(key), str(target), Config=self.transfer)
        size = target.stat().st_size
        if size != expected.size_bytes or sha256_file(target) != expected.sha256:
            raise CheckpointFileError(f"checkpoint file {key} is damaged: the downloaded bytes do not match its sha256")

    @contextlib.contextmanager
    def local_copy(self, key: str, sha256: str, size_bytes: int | None = None) -> Iterator[Path]:
        expected = self.verified_head(key, sha256, size_bytes)
        fd, name = tempfile.mkstemp(prefix="ddpm-", suffix=f"-{PurePosixPath(key).name}")
        os.close(fd)
        target = Path(name)
        try:
            self._download_verified(key, target, expected)
            yield target
        finally:
            target.unlink(missing_ok=True)

    def resume_copy(self, key: str) -> Path:
        """Downloaded into `root / key` (atomically) unless an identical copy is already there;
        checked against the sha256 that publish stored with the object."""
        expected = self.head(key)
        if expected.sha256 is None:
            raise CheckpointFileError(f"{self.describe(key)} carries no sha256: not uploaded by this service")
        target = self.resolve(key)
        if target.is_file() and target.stat().st_size == expected.size_bytes and sha256_file(target) == expected.sha256:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self._download_verified(key, Path(name), expected)
            os.replace(name, target)
        finally:
            Path(name).unlink(missing_ok=True)
        fsync_directory(target.parent)
        return target

    def read(
        self, key: str, sha256: str, byte_range: tuple[int, int] | None = None, chunk: int = _MB
    ) -> Iterator[bytes]:
        extra = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
        with self._s3_errors(f"checkpoint file {key}"):
            body = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key), **extra)["Body"]
        return checked_chunks(key, body.iter_chunks(chunk_size=chunk), None if byte_range else sha256, body.close)

    def presigned_url(self, key: str, *, media_type: str, filename: str | None) -> str:
        params = {"Bucket": self.bucket, "Key": self.object_key(key), "ResponseContentType": media_type}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=self.presign_expires_s)


def make_store(settings: Settings) -> CheckpointStore:
    """The store DDPM_STORAGE names, with the local checkpoint root as its scratch space."""
    if settings.storage == "s3":
        return S3Store(settings.checkpoint_root, settings)
    return LocalStore(settings.checkpoint_root)
