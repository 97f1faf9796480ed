"""worker/datasets/archive.py: members of zip, tar and tar.gz read in memory; every hostile or
broken archive a skip with its reason or a PreparationFailed naming the figures."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import random
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.worker.datasets.sample_images import LIMITS, encode, solid, special, tar_bytes, write_tar, write_zip
from worker.datasets import Limits, Member, PreparationFailed, Skipped, archive
from worker.datasets.archive import TAR, TAR_GZ, ZIP, archive_format, archive_members
from worker.datasets.images import HIDDEN_FILE, NOT_AN_IMAGE_FILE

PNG = encode(solid("RGB", (1, 2, 3)), "PNG")
FILES = {"b.png": PNG, "a/c.jpg": b"c" * 10, "notes.txt": b"text", "__MACOSX/a/._c.jpg": b"mac", "a/d.webp": b"dd"}
EXPECTED = [
    ("b.png", PNG),
    ("a/c.jpg", b"c" * 10),
    Skipped("notes.txt", NOT_AN_IMAGE_FILE),
    Skipped("__MACOSX/a/._c.jpg", HIDDEN_FILE),
    ("a/d.webp", b"dd"),
]


def write(kind: str, path: Path, files: dict[str, bytes]) -> Path:
    return write_zip(path, files) if kind == ZIP else write_tar(path, files, gz=kind == TAR_GZ)


def read_all(path: Path, limits: Limits = LIMITS) -> list[object]:
    """Every item, each Member read as it comes (as prepare does): (name, bytes) or Skipped."""
    out: list[object] = []
    for item in archive_members(path, limits):
        if isinstance(item, Member):
            data = item.read()
            assert item.size == len(data)
            out.append((item.name, data))
        else:
            out.append(item)
    return out


def failure(path: Path, limits: Limits = LIMITS) -> str:
    with pytest.raises(PreparationFailed) as caught:
        read_all(path, limits)
    return str(caught.value)


@pytest.mark.parametrize("kind", [ZIP, TAR, TAR_GZ])
class TestEveryFormat:
    def test_members_in_archive_order_read_in_memory(self, kind: str, tmp_path: Path) -> None:
        path = write(kind, tmp_path / "upload.bin", FILES)  # no telling name: sniffed
        assert archive_format(path) == kind
        assert read_all(path) == EXPECTED
        assert sorted(p.name for p in tmp_path.iterdir()) == ["upload.bin"]  # nothing extracted

    def test_unsafe_paths_are_skipped(self, kind: str, tmp_path: Path) -> None:
        names = ["/etc/abs.png", "../up.png", "a/../../up2.png", "a\\..\\win.png", "C:/x.png", "\\\\srv\\y.png"]
        path = write(kind, tmp_path / "a", dict.fromkeys(names, PNG) | {"ok..name.png": PNG})
        assert read_all(path) == [Skipped(n, "unsafe path") for n in names] + [("ok..name.png", PNG)]

    def test_empty_archive(self, kind: str, tmp_path: Path) -> None:
        assert read_all(write(kind, tmp_path / "a", {})) == []

    def test_too_large_member_is_never_read(self, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(archive, "MAX_MEMBER_BYTES", 100)
        path = write(kind, tmp_path / "a", {"big.png": b"x" * 101, "ok.png": b"y" * 100})
        assert read_all(path) == [Skipped("big.png", "too large (101 bytes, over 100)"), ("ok.png", b"y" * 100)]


class TestSniffing:
    @pytest.mark.parametrize(
        ("data", "message"),
        [
            (b"", "the archive is empty (0 bytes)"),
            (bz2.compress(b"x" * 600), "not a zip, tar or tar.gz archive (it looks like bzip2); upload one of those"),
            (PNG, "not a zip, tar or tar.gz archive (it looks like a single PNG image); upload one of those"),
            (b"hello" * 200, "not a zip, tar or tar.gz archive; upload one of those"),
        ],
    )
    def test_not_an_archive(self, tmp_path: Path, data: bytes, message: str) -> None:
        (tmp_path / "x.zip").write_bytes(data)
        assert failure(tmp_path / "x.zip") == message

    def test_a_zip_with_data_in_front(self, tmp_path: Path) -> None:
        zipped = write_zip(tmp_path / "a.zip", {"a.png": PNG}).read_bytes()
        (tmp_path / "sfx").write_bytes(b"#!/bin/sh\nexit 0\n" + zipped)
        assert archive_format(tmp_path / "sfx") == ZIP
        assert read_all(tmp_path / "sfx") == [("a.png", PNG)]

    def test_a_gzip_without_a_tar(self, tmp_path: Path) -> None:
        (tmp_path / "x.gz").write_bytes(gzip.compress(b"just text, not a tar archive\n" * 40))
        assert failure(tmp_path / "x.gz").startswith(
            "the archive is truncated or damaged (no tar archive in the gzip stream?): "
        )


class TestNotRegularFiles:
    @pytest.mark.parametrize("gz", [False, True])
    def test_tar_links_devices_fifos_and_directories(self, tmp_path: Path, gz: bool) -> None:
        extra = [
            special("dir", tarfile.DIRTYPE),
            special("sym.png", tarfile.SYMTYPE, "/etc/passwd"),
            special("hard.png", tarfile.LNKTYPE, "a.png"),
            special("fifo.png", tarfile.FIFOTYPE),
            special("tty.png", tarfile.CHRTYPE),
            special("disk.png", tarfile.BLKTYPE),
        ]
        path = write_tar(tmp_path / "a", {"a.png": PNG}, gz=gz, extra=extra)
        assert read_all(path) == [
            ("a.png", PNG),
            Skipped("sym.png", "link"),
            Skipped("hard.png", "link"),
            Skipped("fifo.png", "not a regular file"),
            Skipped("tty.png", "not a regular file"),
            Skipped("disk.png", "not a regular file"),
        ]

    def test_zip_symlink_and_directory(self, tmp_path: Path) -> None:
        path = tmp_path / "a.zip"
        with zipfile.ZipFile(path, "w") as zf:
            link = zipfile.ZipInfo("link.png")
            link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
            zf.writestr(link, "/etc/passwd")
            zf.writestr("folder/", b"")
            fifo = zipfile.ZipInfo("fifo.png")
            fifo.create_system, fifo.external_attr = 3, (stat.S_IFIFO | 0o644) << 16
            zf.writestr(fifo, b"")
            zf.writestr("folder/a.png", PNG)
        assert read_all(path) == [
            Skipped("link.png", "link"),
            Skipped("fifo.png", "not a regular file"),
            ("folder/a.png", PNG),
        ]

    def test_zip_encrypted_and_unknown_method_members_are_skipped(self, tmp_path: Path) -> None:
        data = bytearray(write_zip(tmp_path / "a.zip", {"e.png": PNG, "m.png": PNG, "ok.png": PNG}).read_bytes())
        first = data.index(b"PK\x01\x02")  # the central directory's entries
        second = data.index(b"PK\x01\x02", first + 4)
        data[first + 8] |= 0x01  # general purpose flag: encrypted
        data[second + 10 : second + 12] = (99).to_bytes(2, "little")  # AES, which zipfile cannot read
        (tmp_path / "a.zip").write_bytes(bytes(data))
        assert read_all(tmp_path / "a.zip") == [
            Skipped("e.png", "encrypted"),
            Skipped("m.png", "unsupported compression (method 99)"),
            ("ok.png", PNG),
        ]


class TestZipMethods:
    def test_stored_deflated_and_lzma_are_read(self, tmp_path: Path) -> None:
        for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA):
            assert read_all(write_zip(tmp_path / "a.zip", {"a.png": PNG * 30}, method)) == [("a.png", PNG * 30)]

    def test_bzip2_is_skipped(self, tmp_path: Path) -> None:
        path = write_zip(tmp_path / "a.zip", {"a.png": PNG}, zipfile.ZIP_BZIP2)
        reason = "unsupported compression (bzip2, a decompression bomb risk; zip it with deflate)"
        assert read_all(path) == [Skipped("a.png", reason)]


class TestBombs:
    ZEROS = b"\0" * (3 << 20)  # 3 MiB of zeros: a few KiB packed

    def test_zip_declared_total_over_the_limit(self, tmp_path: Path) -> None:
        path = write_zip(tmp_path / "a.zip", {"a.png": b"x" * 600, "b.txt": b"y" * 600}, zipfile.ZIP_STORED)
        limits = dataclasses.replace(LIMITS, max_unpacked_bytes=1000)
        assert failure(path, limits) == (
            "the archive unpacks to 1,200 bytes, over the limit of 1,000 (DDPM_DATASET_MAX_UNPACKED_BYTES); "
            "is it a zip bomb?"
        )

    def test_zip_ratio_over_the_limit_before_anything_is_read(self, tmp_path: Path) -> None:
        path = write_zip(tmp_path / "a.zip", {"notes.txt": self.ZEROS})  # not even an image
        packed = path.stat().st_size
        ratio = len(self.ZEROS) / packed
        assert ratio > 200
        assert failure(path) == (
            f"the archive unpacks to {len(self.ZEROS):,} bytes from {packed:,}: {ratio:,.0f} times its size, "
            "over the limit of 200 (DDPM_DATASET_MAX_RATIO); is it a zip bomb?"
        )

    def test_zip_ratio_under_the_floor_is_no_bomb(self, tmp_path: Path) -> None:
        path = write_zip(tmp_path / "a.zip", {"a.png": b"\0" * (1 << 20)})
        assert read_all(path) == [("a.png", b"\0" * (1 << 20))]

    def test_tar_gz_counts_what_it_decompresses_even_for_skipped_members(self, tmp_path: Path) -> None:
        path = write_tar(tmp_path / "a", {"notes.txt": self.ZEROS, "a.png": PNG}, gz=True)
        message = failure(path)
        assert message.startswith("the archive unpacks to more than ") and message.endswith(
            f"bytes from {path.stat().st_size:,}: "
            + message.split(": ")[1].split(" times")[0]
            + " times its size, over the limit of 200 (DDPM_DATASET_MAX_RATIO); is it a zip bomb?"
        )

    def test_tar_gz_total_over_the_limit_while_reading(self, tmp_path: Path) -> None:
        path = write_tar(tmp_path / "a", {"a.png": b"\1" * 5000}, gz=True)
        limits = dataclasses.replace(LIMITS, max_unpacked_bytes=4000)
        assert failure(path, limits) == (
            "the archive unpacks to more than 10,240 bytes, over the limit of 4,000 "
            "(DDPM_DATASET_MAX_UNPACKED_BYTES); is it a zip bomb?"
        )  # tarfile reads 10,240-byte records: the first one is already too many

    def test_a_huge_pax_or_long_name_header_is_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(archive, "MAX_HEADER_BYTES", 200)
        path = write_tar(tmp_path / "a", {"d/" * 150 + "a.png": PNG})  # GNU long name: 306 bytes (with its NUL)
        assert failure(path) == "the archive is truncated or damaged: a 306-byte name or pax header"


class TestSizes:
    def test_an_archive_over_the_source_limit(self, tmp_path: Path) -> None:
        path = write_zip(tmp_path / "a.zip", {"a.png": PNG})
        size = path.stat().st_size
        limits = dataclasses.replace(LIMITS, max_source_bytes=size - 1)
        assert failure(path, limits) == (
            f"the archive is {size:,} bytes, over the limit of {size - 1:,} (DDPM_MAX_DATASET_BYTES)"
        )

    def test_a_zip_listing_too_many_files(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = write_zip(tmp_path / "a.zip", {f"{i}.png": b"" for i in range(20)})
        with zipfile.ZipFile(path) as zf:
            listed = sum(46 + len(info.filename) + len(info.extra) for info in zf.infolist())
        assert archive.central_directory_bytes(path) == listed
        monkeypatch.setattr(archive, "MAX_CENTRAL_DIRECTORY_BYTES", listed)
        assert len(read_all(path)) == 20
        monkeypatch.setattr(archive, "MAX_CENTRAL_DIRECTORY_BYTES", listed - 1)
        assert failure(path) == (
            f"the zip's list of files takes {listed:,} bytes, over the limit of {listed - 1:,} (about a million "
            "files); split it into several data sets, or upload a tar"
        )

    def test_a_zip64_end_record_is_read_too(self, tmp_path: Path) -> None:
        data = write_zip(tmp_path / "a.zip", {"a.png": PNG}).read_bytes()
        end = data.rfind(b"PK\x05\x06")
        count, listed, offset = struct.unpack_from("<HII", data, end + 10)
        record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, 10**12, offset)
        locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, end, 1)
        (tmp_path / "a.zip").write_bytes(data[:end] + record + locator + data[end:])
        assert archive.central_directory_bytes(tmp_path / "a.zip") == len(data) + 76  # at most the file
        assert archive.central_directory_bytes(write_zip(tmp_path / "b.zip", {"a.png": PNG})) == listed
        assert archive.central_directory_bytes(write_tar(tmp_path / "c.tar", {"a.png": PNG})) == 0


class TestDamage:
    """Policy: a damaged or cut-off archive fails whole (naming how far it got), never a partial set."""

    def test_tar_cut_inside_a_header(self, tmp_path: Path) -> None:
        data = tar_bytes({"a.png": PNG, "b.png": PNG})
        second = 512 + len(PNG) + (-len(PNG)) % 512
        (tmp_path / "a.tar").write_bytes(data[: second + 100])
        assert failure(tmp_path / "a.tar") == (
            "the archive is truncated or damaged: it stops before its end-of-archive marker after 1 members "
            "(the last: a.png); upload it again whole"
        )

    def test_tar_cut_between_members(self, tmp_path: Path) -> None:
        data = tar_bytes({"a.png": PNG, "b.png": PNG})
        (tmp_path / "a.tar").write_bytes(data[: 2 * (512 + len(PNG) + (-len(PNG)) % 512)])
        assert "it stops before its end-of-archive marker after 2 members (the last: b.png)" in failure(
            tmp_path / "a.tar"
        )

    def test_tar_cut_inside_a_member(self, tmp_path: Path) -> None:
        (tmp_path / "a.tar").write_bytes(tar_bytes({"a.png": PNG})[: 512 + 10])
        assert failure(tmp_path / "a.tar").startswith("the archive is truncated or damaged")

    def test_tar_with_a_damaged_header(self, tmp_path: Path) -> None:
        data = bytearray(tar_bytes({"a.png": PNG, "b.png": PNG}))
        data[512 + len(PNG) + (-len(PNG)) % 512] ^= 0xFF  # the second header's first byte
        (tmp_path / "a.tar").write_bytes(bytes(data))
        assert failure(tmp_path / "a.tar") == (
            "the archive is truncated or damaged: a damaged header (bad checksum) after 1 members "
            "(the last: a.png); upload it again whole"
        )

    def test_tar_gz_cut_off(self, tmp_path: Path) -> None:
        data = write_tar(tmp_path / "a", {"a.png": PNG, "b.png": PNG}, gz=True).read_bytes()
        (tmp_path / "a").write_bytes(data[:-4])  # the trailer's length field
        assert failure(tmp_path / "a") == (
            "the archive is truncated or damaged after 2 members (the gzip stream): "
            "Compressed file ended before the end-of-stream marker was reached"
        )

    def test_tar_gz_with_a_wrong_crc(self, tmp_path: Path) -> None:
        data = bytearray(write_tar(tmp_path / "a", {"a.png": PNG}, gz=True).read_bytes())
        data[-8] ^= 0xFF
        (tmp_path / "a").write_bytes(bytes(data))
        assert failure(tmp_path / "a").startswith(
            "the archive is truncated or damaged after 1 members (the gzip stream): CRC check failed"
        )

    def test_zip_cut_off(self, tmp_path: Path) -> None:
        data = write_zip(tmp_path / "a.zip", {"a.png": PNG}).read_bytes()
        (tmp_path / "a.zip").write_bytes(data[:-30])
        assert failure(tmp_path / "a.zip") == "the archive is truncated or damaged: File is not a zip file"

    def test_zip_member_with_a_bad_crc(self, tmp_path: Path) -> None:
        data = bytearray(write_zip(tmp_path / "a.zip", {"a.png": PNG}, zipfile.ZIP_STORED).read_bytes())
        data[30 + len("a.png") + 20] ^= 0xFF  # a byte of the stored data
        (tmp_path / "a.zip").write_bytes(bytes(data))
        assert failure(tmp_path / "a.zip") == (
            "the archive is truncated or damaged at member 1 (a.png): Bad CRC-32 for file 'a.png'"
        )

    @pytest.mark.parametrize(("declared", "message"), [(50, "Bad CRC-32 for file 'a.png'"), (None, "")])
    def test_zip_member_unlike_its_declared_size(self, tmp_path: Path, declared: int | None, message: str) -> None:
        data = bytearray(write_zip(tmp_path / "a.zip", {"a.png": PNG}).read_bytes())
        entry = data.index(b"PK\x01\x02")  # the central directory's entry: its uncompressed size at +24
        declared = declared or len(PNG) + 1000
        data[entry + 24 : entry + 28] = declared.to_bytes(4, "little")
        (tmp_path / "a.zip").write_bytes(bytes(data))
        message = message or f"{len(PNG):,} bytes where it declares {declared:,}"
        assert failure(tmp_path / "a.zip") == f"the archive is truncated or damaged at member 1 (a.png): {message}"

    def test_members_before_the_damage_were_handed_on_then_it_fails(self, tmp_path: Path) -> None:
        (tmp_path / "a.tar").write_bytes(tar_bytes({"a.png": PNG, "b.png": PNG})[:1600])
        seen = []
        with pytest.raises(PreparationFailed):
            for item in archive_members(tmp_path / "a.tar", LIMITS):
                assert isinstance(item, Member)
                seen.append((item.name, item.read()))
        assert seen == [("a.png", PNG)]


class TestStreamOrder:
    def test_a_tar_member_cannot_be_read_after_the_next_was_taken(self, tmp_path: Path) -> None:
        items = archive_members(write_tar(tmp_path / "a", {"a.png": PNG, "b.png": PNG}, gz=True), LIMITS)
        first = next(items)
        next(items)
        assert isinstance(first, Member)
        with pytest.raises(RuntimeError, match="after the next member was taken"):
            first.read()


def _mutations(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = [data[:n] for n in range(1, len(data), max(1, len(data) // 40))]
    flips = []
    for _ in range(40):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        flips.append(bytes(mutated))
    return cuts + flips


MAKERS = {
    ZIP: lambda p: write_zip(p, FILES),
    TAR: lambda p: write_tar(p, FILES),
    TAR_GZ: lambda p: write_tar(p, FILES, gz=True),
}


@pytest.mark.parametrize("make", MAKERS.values(), ids=MAKERS.keys())
def test_fuzz_only_preparation_failed(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    """Truncated, mutated and random bytes: members or PreparationFailed, never another error."""
    rng = random.Random(7)
    original = make(tmp_path / "original").read_bytes()
    cases = _mutations(original, rng) + [original[:4] + rng.randbytes(rng.randrange(2000)) for _ in range(20)]
    outcomes = set()
    for data in cases:
        (tmp_path / "case").write_bytes(data)
        try:
            read_all(tmp_path / "case")
            outcomes.add("read")
        except PreparationFailed as e:
            assert str(e)
            outcomes.add("failed")
    assert "failed" in outcomes  # (a tar.gz's CRC makes every mutation fail)
