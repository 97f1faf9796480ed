"""An uploaded archive's members, read without extracting anything to disk.

The format is sniffed from the bytes (zip, tar, or tar in gzip), never taken from a name. Each
member that may be an image is handed on as a `Member` whose `read()` returns its bytes (in
memory, at most MAX_MEMBER_BYTES); nothing is ever written anywhere. What is not read:
- directories: not yielded at all (they are structure, not files);
- links (symbolic and hard), devices, fifos, sparse files: `Skipped` ("link", "not a regular file");
- absolute names (`/x`, `\\x`, `C:x`) and names with a `..` component: `Skipped` ("unsafe path");
- hidden files and macOS metadata (`__MACOSX/`, `.DS_Store`): `Skipped`, counted quietly;
- names without an image suffix: `Skipped` ("not an image file"), see `images.name_skip_reason`.

Zip bombs: a zip's declared sizes are summed before anything is read, and the bytes actually
unpacked are counted while reading (a tar.gz's decompressed stream, including the members that
are skipped over): more than `Limits.max_unpacked_bytes`, or more than `Limits.max_ratio` times
the archive's own size (once over RATIO_FLOOR_BYTES), is PreparationFailed with the figures.

Damage: a truncated or damaged archive is PreparationFailed ("the archive is truncated or
damaged: ...", with how many members were read before it), never a partial set. An upload that
broke off is far likelier than a user who wants the first part of an archive, and a prepared set
that silently lacks files would be worse than a clear error. That includes a tar that ends
without its end-of-archive marker (cut off, which Python's tarfile would take as the end) and a
gzip stream whose trailer is missing or whose CRC does not match. A zip member that is encrypted
or compressed with bzip2 or a method zipfile lacks is skipped with that reason (the zip is not
damaged). A zip whose list of files is over MAX_CENTRAL_DIRECTORY_BYTES is refused before
zipfile loads it (a ZipInfo per entry: millions of tiny entries would fill memory).

`read()` of a tar member must be called before the next item is taken from the iterator (a
tar.gz is a stream); a zip member's any time while the iterator is open.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from worker.datasets import Limits, Member, PreparationFailed, Skipped
from worker.datasets.images import display_name, name_skip_reason

ZIP, TAR, TAR_GZ = "zip", "tar", "tar.gz"
DAMAGED = "the archive is truncated or damaged"
RATIO_FLOOR_BYTES = 1 << 20  # a high ratio over less than this is no bomb (a zip of one empty file)
MAX_MEMBER_BYTES = 512 << 20  # larger members are skipped, never read into memory
MAX_HEADER_BYTES = 1 << 20  # a tar long-name or pax header larger than this is hostile
READ_CHUNK = 1 << 20
MAX_CENTRAL_DIRECTORY_BYTES = 128 << 20  # a zip's list of files (about 100 bytes per file)
_EOCD_SEARCH_BYTES = 22 + 65535  # the end record and the longest comment
# Zip compression methods read. zipfile bounds deflate's output per read; LZMA's it does not,
# so LZMA members are read 4 KiB of input at a time (at most ~7,000x: ~30 MB out). bzip2 cannot
# be bounded (4 KiB of it can hold gigabytes), so bzip2 members are skipped.
ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA})
LZMA_READ = 4096
LINK = "link"
NOT_REGULAR = "not a regular file"
UNSAFE_PATH = "unsafe path"

_OTHER_FORMATS = (  # magic numbers of what people upload by mistake, for a clear message
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!", "rar"),
    (b"\x89PNG", "a single PNG image"),
    (b"\xff\xd8\xff", "a single JPEG image"),
)


def archive_members(path: Path, limits: Limits) -> Iterator[Member | Skipped]:
    """The members of the archive at `path`, in the archive's order (see the module docstring)."""
    size = path.stat().st_size
    if size > limits.max_source_bytes:
        raise PreparationFailed(
            f"the archive is {size:,} bytes, over the limit of {limits.max_source_bytes:,} (DDPM_MAX_DATASET_BYTES)"
        )
    kind = archive_format(path)
    budget = _Budget(limits, size)
    if kind == ZIP:
        yield from _zip_members(path, budget)
    else:
        yield from _tar_members(path, kind == TAR_GZ, budget)


def archive_format(path: Path) -> str:
    """ZIP, TAR or TAR_GZ, from the file's first bytes; PreparationFailed for anything else."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise PreparationFailed("the archive is empty (0 bytes)")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return ZIP
    if head.startswith(b"\x1f\x8b"):
        return TAR_GZ
    if head[257:262] == b"ustar" or _is_tar_header(head):
        return TAR
    if zipfile.is_zipfile(path):  # a zip with data in front of it (a self-extracting one)
        return ZIP
    what = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), None)
    if what is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        what = "a single WebP image"
    seen = f" (it looks like {what})" if what else ""
    raise PreparationFailed(f"not a zip, tar or tar.gz archive{seen}; upload one of those")


def _is_tar_header(block: bytes) -> bool:
    """An old (v7) tar without the ustar magic (its first header's checksum is right), or an
    empty tar (a zero block: its end-of-archive marker)."""
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        return True
    except (tarfile.HeaderError, ValueError):
        return False
    return True


class _Budget:
    """The bytes unpacked so far against the limits: the zip bomb check, upfront and while reading."""

    def __init__(self, limits: Limits, packed: int) -> None:
        self.limits = limits
        self.packed = max(packed, 1)
        self.unpacked = 0

    def declare(self, total: int) -> None:
        """A zip's members' declared sizes, before anything is read."""
        self._check(total, "unpacks to")

    def add(self, n: int) -> None:
        self.unpacked += n
        self._check(self.unpacked, "unpacks to more than")

    def _check(self, total: int, verb: str) -> None:
        limit = self.limits.max_unpacked_bytes
        if total > limit:
            raise PreparationFailed(
                f"the archive {verb} {total:,} bytes, over the limit of {limit:,} "
                "(DDPM_DATASET_MAX_UNPACKED_BYTES); is it a zip bomb?"
            )
        ratio = total / self.packed
        if total > RATIO_FLOOR_BYTES and ratio > self.limits.max_ratio:
            raise PreparationFailed(
                f"the archive {verb} {total:,} bytes from {self.packed:,}: {ratio:,.0f} times its size, "
                f"over the limit of {self.limits.max_ratio:g} (DDPM_DATASET_MAX_RATIO); is it a zip bomb?"
            )

    def read(self, f: BinaryIO, size: int = READ_CHUNK) -> bytes:
        """All of `f` (a member being unpacked), counted chunk by chunk."""
        chunks = []
        while chunk := f.read(size):
            self.add(len(chunk))
            chunks.append(chunk)
        return b"".join(chunks)


@contextlib.contextmanager
def _damage_is_failure(after: str = "") -> Iterator[None]:
    """Whatever zipfile, tarfile, gzip, zlib, bz2 or lzma raise for damaged bytes (BadZipFile,
    ReadError, EOFError, OSError, zlib.error, struct.error, UnicodeDecodeError, ...) as
    PreparationFailed naming the damage; PreparationFailed itself passes through."""
    try:
        yield
    except PreparationFailed:
        raise
    except Exception as e:  # hostile bytes: every library error type is a damaged archive
        text = str(e).strip() or type(e).__name__
        raise PreparationFailed(f"{DAMAGED}{after}: {text[:200]}") from e


def _screen(name: str) -> str | None:
    """Why a regular file of this name is not read, or None."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in re.split(r"[\\/]", name):
        return UNSAFE_PATH
    return name_skip_reason(name)


def _candidate(name: str, size: int, read: Callable[[], bytes], reason: str | None) -> Member | Skipped:
    """The member, or Skipped: for `reason` (the name's, see `_screen`) if any, or as too large."""
    if reason is None and size > MAX_MEMBER_BYTES:
        reason = f"too large ({size:,} bytes, over {MAX_MEMBER_BYTES:,})"
    return Member(display_name(name), size, read) if reason is None else Skipped(display_name(name), reason)


# --- zip ------------------------------------------------------------------------------------------


def _zip_members(path: Path, budget: _Budget) -> Iterator[Member | Skipped]:
    directory = central_directory_bytes(path)
    if directory > MAX_CENTRAL_DIRECTORY_BYTES:
        raise PreparationFailed(
            f"the zip's list of files takes {directory:,} bytes, over the limit of {MAX_CENTRAL_DIRECTORY_BYTES:,} "
            "(about a million files); split it into several data sets, or upload a tar"
        )
    with _damage_is_failure():
        zf = zipfile.ZipFile(path)
    with zf:
        infos = zf.infolist()
        budget.declare(sum(info.file_size for info in infos))
        for count, info in enumerate(infos, start=1):
            kind = stat.S_IFMT(info.external_attr >> 16)  # the unix file type; 0 from other systems
            if info.is_dir() or stat.S_ISDIR(kind):
                continue
            reason = _screen(info.filename)
            if kind and not stat.S_ISREG(kind):
                reason = LINK if stat.S_ISLNK(kind) else NOT_REGULAR
            elif reason is None and info.flag_bits & 0x1:
                reason = "encrypted"
            elif reason is None and info.compress_type == zipfile.ZIP_BZIP2:
                reason = "unsupported compression (bzip2, a decompression bomb risk; zip it with deflate)"
            elif reason is None and info.compress_type not in ZIP_METHODS:
                reason = f"unsupported compression (method {info.compress_type})"
            yield _candidate(info.filename, info.file_size, _zip_reader(zf, info, budget, count), reason)


def central_directory_bytes(path: Path) -> int:
    """The size of a zip's central directory as its end record declares it (zip64's too), read
    before zipfile loads all of it and a ZipInfo per entry into memory (which it does whatever
    the size: millions of tiny entries are a memory bomb); 0 when no end record is found (zipfile
    then says what is wrong). Never more than the file's size (zipfile reads no more than that)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _EOCD_SEARCH_BYTES))
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return 0
        declared = struct.unpack_from("<I", tail, at + 12)[0]
        locator = at - 20  # the zip64 locator, if any, sits right before the end record
        if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":
            f.seek(struct.unpack_from("<Q", tail, locator + 8)[0])
            record = f.read(56)
            if len(record) == 56 and record[:4] == b"PK\x06\x06":
                declared = max(declared, struct.unpack_from("<Q", record, 40)[0])
    return min(declared, size)


def _zip_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget, count: int) -> Callable[[], bytes]:
    where = f" at member {count} ({display_name(info.filename)})"

    def read() -> bytes:
        chunk = LZMA_READ if info.compress_type == zipfile.ZIP_LZMA else READ_CHUNK
        with _damage_is_failure(where), zf.open(info) as f:
            data = budget.read(f, chunk)  # zipfile stops at the declared size; a CRC check catches more
        if len(data) != info.file_size:
            raise PreparationFailed(f"{DAMAGED}{where}: {len(data):,} bytes where it declares {info.file_size:,}")
        return data

    return read


# --- tar and tar.gz -------------------------------------------------------------------------------


class _Counted:
    """A stream whose bytes (a tar.gz's decompressed ones, or a plain tar's) count against the budget."""

    def __init__(self, stream: BinaryIO, budget: _Budget) -> None:
        self.stream = stream
        self.budget = budget

    def read(self, size: int) -> bytes:
        data = self.stream.read(size)
        self.budget.add(len(data))
        return data


class _TarState:
    """How tarfile's last header read failed (that is how the archive ended), and the member
    whose bytes may be read now (a stream cannot go back)."""

    error: tarfile.HeaderError | None = None
    current: tarfile.TarInfo | None = None


def _header_class(end: _TarState) -> type[tarfile.TarInfo]:
    """A TarInfo that records why a header could not be read (tarfile takes a truncated or
    invalid header after the first as the end of the archive, silently) and refuses a long-name
    or pax header too large to hold in memory (tarfile reads those whole)."""

    class Header(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
            try:
                header = super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as e:
                end.error = e
                raise
            meta = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)
            if header.type in meta and header.size > MAX_HEADER_BYTES:
                raise PreparationFailed(f"{DAMAGED}: a {header.size:,}-byte name or pax header")
            return header

    return Header


def _tar_members(path: Path, gz: bool, budget: _Budget) -> Iterator[Member | Skipped]:
    with open(path, "rb") as raw:
        stream = _Counted(gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw, budget)
        end = _TarState()
        with _damage_is_failure(" (no tar archive in the gzip stream?)" if gz else ""):
            try:
                tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=_header_class(end))  # noqa: SIM115 (closed below)
            except tarfile.ReadError:
                if isinstance(end.error, tarfile.EOFHeaderError):
                    return  # only the end-of-archive marker: an empty archive
                raise
        count, last = 0, "(none)"
        with tar:
            while True:
                with _damage_is_failure(f" after {count} members (the last: {last})"):
                    header = tar.next()
                if header is None:
                    break
                tar.members.clear()  # tarfile keeps every header it read; a stream needs none
                count, last, end.current = count + 1, display_name(header.name), header
                item = _tar_item(tar, header, budget, count, end)
                if item is not None:
                    yield item
        _check_tar_end(end, count, last)
        if gz:
            with _damage_is_failure(f" after {count} members (the gzip stream)"):
                while stream.read(READ_CHUNK):  # to the trailer: its CRC and length are checked
                    pass


def _tar_item(
    tar: tarfile.TarFile, header: tarfile.TarInfo, budget: _Budget, count: int, state: _TarState
) -> Member | Skipped | None:
    if header.isdir():
        return None
    if header.issym() or header.islnk():
        return Skipped(display_name(header.name), LINK)
    if not header.isreg() or header.issparse():
        return Skipped(display_name(header.name), NOT_REGULAR)

    where = f" at member {count} ({display_name(header.name)})"

    def read() -> bytes:
        if state.current is not header:
            raise RuntimeError("a tar member's read() was called after the next member was taken")
        with _damage_is_failure(where):
            f = tar.extractfile(header)
            data = budget.read(f) if f is not None else b""
        if len(data) != header.size:
            raise PreparationFailed(f"{DAMAGED}{where}: {len(data):,} bytes where it declares {header.size:,}")
        return data

    return _candidate(header.name, header.size, read, _screen(header.name))


def _check_tar_end(end: _TarState, count: int, last: str) -> None:
    """PreparationFailed unless the archive ended with its end-of-archive marker (a zero block)."""
    if end.error is None or isinstance(end.error, tarfile.EOFHeaderError):
        return
    if isinstance(end.error, tarfile.InvalidHeaderError):
        detail = f"a damaged header ({end.error})"
    else:  # EmptyHeaderError, TruncatedHeaderError: the bytes stop
        detail = "it stops before its end-of-archive marker"
    raise PreparationFailed(f"{DAMAGED}: {detail} after {count} members (the last: {last}); upload it again whole")
