"""A data set's members made into the prepared set: `images.tar`, `preview.png` and a summary.

Members arrive one at a time (from `archive.archive_members` or `sources.source_members`), each
is read and decoded once (`images.decode_image`), and only the kept bytes stay: they are appended
to a spool file next to the output, with a small index entry in memory (name, offset, length,
extension), so 50,000 images never sit in memory together. At the end the index is sorted by
member name (arrival order breaks ties) and the tar is written from the spool in that order: the
same images give the same tar, byte for byte, whether they came in a zip, a tar or a tar.gz, in
whatever order and with whatever mtimes (the tar's headers hold nothing but the index name
`00000000.png` and the size: mtime 0, uid/gid 0, mode 0o644, ustar, no pax timestamps).

The preview is a grid of the first (by that same order) up to 64 images, 8 per row, each
centre-cropped to fill a 64x64 cell as training crops (`worker/ddpm/data.py` `_fit`), decoded
again from the spool at the end.

Both files are written crash-safely (`app.files.atomic_file`: temporary file, fsync, rename);
the spool is an unlinked temporary file. Disk: the spool and the tar, each about the size of
the kept images, exist together for a moment.
"""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

from PIL import Image, ImageOps

from app.files import atomic_file, atomic_write
from worker.datasets import Limits, Member, PreparationFailed, Skipped
from worker.datasets.images import HIDDEN_FILE, Decoded, decode_image, reason_category

IMAGES_TAR = "images.tar"
PREVIEW_PNG = "preview.png"
PREVIEW_IMAGES = 64  # 8 x 8 cells
PREVIEW_COLUMNS = 8
CELL = 64  # pixels, square
TOP_SIZES = 10
EXAMPLES = 10
PROGRESS_EVERY_S = 1.0
QUIET_REASONS = frozenset({HIDDEN_FILE})  # counted, never shown as examples


@dataclass(frozen=True)
class Prepared:
    images_tar: Path
    sha256: str
    size_bytes: int
    image_count: int
    skipped: int
    preview: Path
    preview_sha256: str
    preview_bytes: int
    summary: dict[str, Any]


class _Entry(NamedTuple):
    """One kept image: where its bytes lie in the spool. Sorted by (name, arrival)."""

    name: str
    arrival: int
    offset: int
    length: int
    ext: str


def prepare(
    members: Iterable[Member | Skipped],
    out_dir: Path,
    limits: Limits,
    progress: Callable[[int], None] | None = None,
) -> Prepared:
    """Decode every member, write `out_dir/images.tar` and `out_dir/preview.png`.

    `progress(n)`, if given, hears how many members were handled so far: about once a second,
    and once at the end. PreparationFailed when no image is usable (naming what was skipped), or
    from the members themselves (a zip bomb, a damaged archive)."""
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    tally = _Tally()
    with tempfile.TemporaryFile(dir=out_dir, prefix=".spool.") as spool:
        entries = _decode_members(members, limits, spool, tally, progress)
        if not entries:
            raise PreparationFailed(tally.nothing_usable())
        entries.sort()
        tar_path = out_dir / IMAGES_TAR
        sha256, size = write_images_tar(tar_path, entries, spool)
        preview = preview_png(entries[:PREVIEW_IMAGES], spool)
    preview_path = out_dir / PREVIEW_PNG
    preview_sha256 = atomic_write(preview_path, preview)
    return Prepared(
        images_tar=tar_path,
        sha256=sha256,
        size_bytes=size,
        image_count=len(entries),
        skipped=tally.skipped,
        preview=preview_path,
        preview_sha256=preview_sha256,
        preview_bytes=len(preview),
        summary=tally.summary(time.monotonic() - started),
    )


def _decode_members(
    members: Iterable[Member | Skipped],
    limits: Limits,
    spool: IO[bytes],
    tally: _Tally,
    progress: Callable[[int], None] | None,
) -> list[_Entry]:
    """Each member read and decoded once; the kept bytes appended to `spool`, indexed."""
    entries: list[_Entry] = []
    handled, reported_at = 0, time.monotonic()
    for member in members:
        if isinstance(member, Skipped):
            tally.skip(member)
        else:
            data = member.read()
            tally.source_bytes += len(data)
            decoded = decode_image(member.name, data, limits)
            if isinstance(decoded, Skipped):
                tally.skip(decoded)
            else:
                entries.append(_Entry(member.name, len(entries), spool.tell(), len(decoded.data), decoded.ext))
                spool.write(decoded.data)
                tally.keep(decoded)
        handled += 1
        if progress is not None and time.monotonic() - reported_at >= PROGRESS_EVERY_S:
            progress(handled)
            reported_at = time.monotonic()
    if progress is not None:
        progress(handled)
    return entries


class _HashingWriter:
    """A write-only file that hashes and counts what passes through to `f`."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def write_images_tar(path: Path, entries: list[_Entry], spool: IO[bytes]) -> tuple[str, int]:
    """The deterministic tar of `entries` (in their order, bytes from `spool`), written
    crash-safely at `path`; its sha256 and size."""
    with atomic_file(path) as f:
        out = _HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
            for index, entry in enumerate(entries):
                info = tarfile.TarInfo(f"{index:08d}.{entry.ext}")  # mtime 0, mode 0o644, uid/gid 0
                info.size = entry.length
                spool.seek(entry.offset)
                tar.addfile(info, spool)
    return out.digest.hexdigest(), out.size


@dataclass
class _Tally:
    """What the summary counts: kept images' sizes (after orientation) and their files' own
    modes, skips by reason category (examples: the first EXAMPLES, hidden files left out), and
    source_bytes, the bytes of every member read (the candidates, not the skipped by name)."""

    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    modes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0
    source_bytes: int = 0

    def keep(self, decoded: Decoded) -> None:
        self.sizes[decoded.image.size] += 1
        self.modes[decoded.mode] += 1

    def skip(self, skipped: Skipped) -> None:
        self.skipped += 1
        self.reasons[reason_category(skipped.reason)] += 1
        if skipped.reason not in QUIET_REASONS and len(self.examples) < EXAMPLES:
            self.examples.append({"name": skipped.name, "reason": skipped.reason})

    def summary(self, seconds: float) -> dict[str, Any]:
        sizes = sorted(self.sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_SIZES]
        return {
            "sizes": [{"width": w, "height": h, "count": n} for (w, h), n in sizes],
            "modes": dict(sorted(self.modes.items())),
            "skipped_reasons": dict(sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
            "skipped_examples": list(self.examples),
            "source_bytes": self.source_bytes,
            "seconds": round(seconds, 3),
        }

    def nothing_usable(self) -> str:
        if not self.skipped:
            return "no usable image: the source holds no files"
        counts = ", ".join(f"{n} {reason}" for reason, n in self.summary(0)["skipped_reasons"].items())
        files = "file" if self.skipped == 1 else "files"
        return f"no usable image: {self.skipped} {files} skipped ({counts})"


def preview_png(entries: list[_Entry], spool: IO[bytes]) -> bytes:
    """The preview grid of `entries` (decoded again from the spool, as training will decode them):
    PREVIEW_COLUMNS cells a row, each image centre-cropped to fill its CELL x CELL cell."""
    columns = min(PREVIEW_COLUMNS, len(entries))
    rows = math.ceil(len(entries) / PREVIEW_COLUMNS)
    grid = Image.new("RGB", (columns * CELL, rows * CELL), (255, 255, 255))
    for i, entry in enumerate(entries):
        spool.seek(entry.offset)
        with Image.open(io.BytesIO(spool.read(entry.length))) as img:
            cell = ImageOps.fit(img.convert("RGB"), (CELL, CELL), Image.Resampling.BICUBIC)
        grid.paste(cell, ((i % PREVIEW_COLUMNS) * CELL, (i // PREVIEW_COLUMNS) * CELL))
    buffer = io.BytesIO()
    grid.save(buffer, "PNG")
    return buffer.getvalue()
