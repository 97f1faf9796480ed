"""What `ddpm datasets upload` sends: an archive file as it is, or a folder as a tar made on the fly.

A folder becomes an uncompressed tar that is the same bytes every time it is made from the same
files: names sorted, every member a regular file with mtime 0, uid/gid 0, no owner names and mode
0o644 (GNU format: long names in a `././@LongLink` block, no pax headers, no timestamps). Nothing
is written to disk: `chunks(offset)` generates the bytes from any offset, so a broken-off upload
resumes by making the same archive again and skipping to where the server's copy ends.

Only stdlib: the client stands alone (see tests/client/test_standalone.py).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

BLOCK = tarfile.BLOCKSIZE  # 512: tar pads every header and every file's data to this
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
CHUNK_BYTES = 1 << 20
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


class ArchiveError(Exception):
    """The path cannot be sent: not an archive, an unreadable folder, a symlink out of it, a file
    that changed while it was being sent."""


class UploadSource(Protocol):
    """Bytes to upload: their total size, Content-Type, a default name and the bytes from `offset`."""

    size: int
    content_type: str
    name: str

    def chunks(self, offset: int = 0, stop: int | None = None) -> Iterator[bytes]: ...


def sniff_content_type(head: bytes, filename: str) -> str | None:
    """The archive's Content-Type from its first 512 bytes (zip, gzip, tar); the file name's
    extension only for an old tar without the `ustar` magic; None when it is none of them."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a local file header, or an empty zip
        return "application/zip"
    if head.startswith(b"\x1f\x8b"):
        return "application/gzip"
    if head[257:262] == b"ustar":
        return "application/x-tar"
    if filename.lower().endswith(".tar") and len(head) >= BLOCK:
        return "application/x-tar"  # v7 tar: no magic; the server sniffs it again
    return None


@dataclass
class ArchiveFile:
    """An archive file (.zip, .tar, .tar.gz, .tgz), sent byte for byte."""

    path: Path
    size: int = field(init=False)
    content_type: str = field(init=False)
    name: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            with self.path.open("rb") as f:
                head = f.read(BLOCK)
                self.size = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise ArchiveError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        content_type = sniff_content_type(head, self.path.name)
        if content_type is None:
            raise ArchiveError(
                f"{self.path} is not a zip, tar or tar.gz archive (by its first bytes); "
                "pass a folder to send its files as a tar"
            )
        self.content_type = content_type
        self.name = _without_suffix(self.path.name)

    def chunks(self, offset: int = 0, stop: int | None = None) -> Iterator[bytes]:
        stop = self.size if stop is None else stop
        with self.path.open("rb") as f:
            if os.fstat(f.fileno()).st_size != self.size:
                raise ArchiveError(f"{self.path} changed size since the upload began")
            f.seek(offset)
            left = stop - offset
            while left > 0:
                data = f.read(min(CHUNK_BYTES, left))
                if not data:
                    raise ArchiveError(f"{self.path} got shorter while it was being sent")
                left -= len(data)
                yield data


@dataclass(frozen=True)
class _Member:
    """One file of the folder's tar: its header block(s), then `size` bytes of `path`, padded.
    The header is made again when it is sent (a large folder's headers are not all kept)."""

    arcname: str
    path: Path
    size: int
    header_bytes: int

    @property
    def header(self) -> bytes:
        return _header(self.arcname, self.size)

    @property
    def span(self) -> int:
        return self.header_bytes + _padded(self.size)


@dataclass
class FolderTar:
    """A folder as a deterministic, uncompressed tar of its regular files (see the module doc).

    Symlinks are followed when they point inside the folder (a file: archived under the link's
    name; a folder: left out, its files are archived where they really are); one pointing out of
    the folder is an ArchiveError. Sockets, pipes and devices are left out (`left_out` names them)."""

    root: Path
    members: list[_Member] = field(init=False)
    left_out: list[str] = field(init=False)
    size: int = field(init=False)
    content_type: str = "application/x-tar"
    name: str = field(init=False)

    def __post_init__(self) -> None:
        try:
            real_root = self.root.resolve(strict=True)
        except OSError as exc:
            raise ArchiveError(f"cannot read {self.root}: {exc.strerror or exc}") from exc
        self.name = real_root.name
        self.left_out = []
        found: list[tuple[str, Path, int]] = []
        self._walk(real_root, real_root, "", found)
        found.sort(key=lambda entry: entry[0].encode("utf-8", "surrogateescape"))
        if not found:
            raise ArchiveError(f"{self.root} holds no files to send")
        self.members = [_Member(name, path, size, len(_header(name, size))) for name, path, size in found]
        self.size = sum(m.span for m in self.members) + len(END_OF_ARCHIVE)

    def _walk(self, real_root: Path, folder: Path, prefix: str, found: list[tuple[str, Path, int]]) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise ArchiveError(f"cannot list {folder}: {exc.strerror or exc}") from exc
        for entry in entries:
            arcname = prefix + entry.name
            path = Path(entry.path)
            if entry.is_symlink():
                target = Path(os.path.realpath(path))
                if not target.is_relative_to(real_root):
                    raise ArchiveError(f"{arcname} is a symlink to {target}, outside {real_root}: refused")
                path = target
            try:
                info = path.stat()
            except OSError as exc:
                raise ArchiveError(f"cannot read {arcname}: {exc.strerror or exc}") from exc
            if stat.S_ISDIR(info.st_mode):
                if not entry.is_symlink():  # a linked folder's files are archived where they are
                    self._walk(real_root, path, arcname + "/", found)
            elif stat.S_ISREG(info.st_mode):
                found.append((arcname, path, info.st_size))
            else:
                self.left_out.append(arcname)

    def chunks(self, offset: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The tar's bytes [offset, stop), in pieces of about CHUNK_BYTES."""
        stop = self.size if stop is None else stop
        buffer = bytearray()
        for piece in self._pieces(offset, stop):
            buffer += piece
            if len(buffer) >= CHUNK_BYTES:
                yield bytes(buffer)
                buffer.clear()
        if buffer:
            yield bytes(buffer)

    def _pieces(self, offset: int, stop: int) -> Iterator[bytes]:
        position = 0  # where the current member starts in the tar
        for member in self.members:
            if position + member.span > offset and position < stop:
                yield from _window(self._member_bytes(member, max(offset - position, 0)), position, offset, stop)
            position += member.span
            if position >= stop:
                return
        yield END_OF_ARCHIVE[max(offset - position, 0) : stop - position]

    def _member_bytes(self, member: _Member, skip: int) -> Iterator[bytes]:
        """The member's header, data and padding, starting `skip` bytes in (the data by seeking)."""
        if skip < member.header_bytes:
            yield member.header[skip:]
            skip = 0
        else:
            skip -= member.header_bytes
        if skip < member.size:
            yield from _file_bytes(member, skip)
            skip = 0
        else:
            skip -= member.size
        yield b"\0" * (_padded(member.size) - member.size - skip)


def _window(pieces: Iterator[bytes], start: int, offset: int, stop: int) -> Iterator[bytes]:
    """Cut a member's pieces (which begin at `max(start, offset)`) at `stop`."""
    position = max(start, offset)
    for piece in pieces:
        if position >= stop:
            return
        yield piece[: stop - position]
        position += len(piece)


def _file_bytes(member: _Member, skip: int) -> Iterator[bytes]:
    try:
        with member.path.open("rb") as f:
            f.seek(skip)
            left = member.size - skip
            while left > 0:
                data = f.read(min(CHUNK_BYTES, left))
                if not data:
                    raise ArchiveError(f"{member.arcname} got shorter while it was being sent")
                left -= len(data)
                yield data
    except OSError as exc:
        raise ArchiveError(f"cannot read {member.arcname}: {exc.strerror or exc}") from exc


def _header(arcname: str, size: int) -> bytes:
    info = tarfile.TarInfo(arcname)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def _without_suffix(filename: str) -> str:
    """`cats.tar.gz` -> `cats`: the default name of the data set."""
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if filename.lower().endswith(suffix) and len(filename) > len(suffix):
            return filename[: -len(suffix)]
    return filename


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def upload_source(path: str | os.PathLike[str]) -> UploadSource:
    """A folder (FolderTar) or an archive file (ArchiveFile) at `path`."""
    p = Path(path)
    if p.is_dir():
        return FolderTar(p)
    if not p.exists():
        raise ArchiveError(f"{p} does not exist")
    return ArchiveFile(p)


def sha256_of(source: UploadSource, stop: int | None = None) -> hashlib._Hash:
    """A sha256 that has read the source's bytes [0, stop)."""
    digest = hashlib.sha256()
    if stop is None or stop > 0:
        for chunk in source.chunks(0, stop):
            digest.update(chunk)
    return digest
