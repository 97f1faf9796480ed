"""worker/datasets/prepare.py: the deterministic prepared tar, the preview grid and the summary."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.worker.datasets.sample_images import (
    LIMITS,
    encode,
    every_mode,
    png_with_size,
    solid,
    special,
    write_tar,
    write_zip,
)
from worker.datasets import Member, PreparationFailed, Skipped
from worker.datasets.archive import archive_members
from worker.datasets.prepare import Prepared, prepare

KEPT = {"l.png", "rgb.png", "rgb.jpg", "l.jpeg", "rgb.webp"}  # 8-bit L/RGB: original bytes
BAD = {
    "dot.png": encode(solid("RGB", 0, (1, 1)), "PNG"),
    "text.png": b"not an image at all\n",
    "cut.png": encode(solid("RGB", (5, 5, 5), (64, 64)), "PNG")[:60],
    "readme.md": b"# hello\n",
    ".DS_Store": b"\0\0\0\1Bud1",
}


PNG = encode(solid("RGB", (1, 2, 3)), "PNG")


def dataset() -> dict[str, bytes]:
    return every_mode() | BAD


def archive_of(kind: str, path: Path, files: dict[str, bytes], mtime: int = 1_700_000_000) -> Path:
    if kind == "zip":
        return write_zip(path, files)
    return write_tar(path, files, gz=kind == "tar.gz", mtime=mtime)


def prepared_from(path: Path, out: Path) -> Prepared:
    return prepare(archive_members(path, LIMITS), out, LIMITS)


def tar_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar.getmembers()]  # type: ignore[union-attr]


class TestPreparedTar:
    def test_every_mode_once(self, tmp_path: Path) -> None:
        files = dataset()
        result = prepared_from(archive_of("zip", tmp_path / "a.zip", files), tmp_path / "out")
        names = sorted(every_mode())  # the order: sorted member names
        assert names[:3] == ["cmyk.jpg", "l.jpeg", "l.png"] and names[-3:] == ["rgba.png", "rgba.webp", "sixteen.png"]
        exts = ["png", "jpg", "png", "png", "png", "png", "png", "jpg", "png", "webp", "png", "png", "png"]
        members = tar_members(result.images_tar)
        assert [info.name for info, _ in members] == [f"{i:08d}.{ext}" for i, ext in enumerate(exts)]
        for (info, data), name in zip(members, names, strict=True):
            assert (info.mtime, info.uid, info.gid, info.mode, info.uname, info.gname) == (0, 0, 0, 0o644, "", "")
            assert (data == every_mode()[name]) == (name in KEPT), name
            with Image.open(io.BytesIO(data)) as img:
                assert img.mode in ("L", "RGB"), name
        assert (result.image_count, result.skipped) == (13, 5)
        assert result.sha256 == hashlib.sha256(result.images_tar.read_bytes()).hexdigest()
        assert result.size_bytes == result.images_tar.stat().st_size
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["images.tar", "preview.png"]

    def test_the_summary(self, tmp_path: Path) -> None:
        files = dataset() | {"huge.png": png_with_size(100_000, 100_000), "../evil.png": PNG}
        links = [special("sym.png", tarfile.SYMTYPE, "/etc/passwd"), special("hard.png", tarfile.LNKTYPE, "l.png")]
        result = prepared_from(write_tar(tmp_path / "a.tar", files, extra=links), tmp_path / "out")
        assert (result.image_count, result.skipped) == (13, 9)
        summary = dict(result.summary)
        assert 0 <= summary.pop("seconds") < 10
        assert summary == {
            "sizes": [{"width": 12, "height": 10, "count": 12}, {"width": 8, "height": 8, "count": 1}],
            "modes": {"1": 1, "CMYK": 1, "I;16": 1, "L": 2, "LA": 1, "P": 2, "RGB": 3, "RGBA": 2},
            "skipped_reasons": {
                "link": 2,
                "damaged image": 1,
                "hidden or macOS metadata file": 1,
                "not a PNG, JPEG or WebP image": 1,
                "not an image file": 1,
                "too many pixels": 1,
                "too small": 1,
                "unsafe path": 1,
            },
            "skipped_examples": [  # in the archive's order; the hidden file is not an example
                {"name": "dot.png", "reason": "too small (1x1)"},
                {"name": "text.png", "reason": "not a PNG, JPEG or WebP image"},
                {"name": "cut.png", "reason": summary["skipped_examples"][2]["reason"]},
                {"name": "readme.md", "reason": "not an image file"},
                {"name": "huge.png", "reason": "too many pixels (over Pillow's bound of 89,478,485)"},
                {"name": "../evil.png", "reason": "unsafe path"},
                {"name": "sym.png", "reason": "link"},
                {"name": "hard.png", "reason": "link"},
            ],
            "source_bytes": sum(len(files[n]) for n in files if n not in ("readme.md", ".DS_Store", "../evil.png")),
        }
        assert summary["skipped_examples"][2]["reason"].startswith("damaged image: ")

    def test_same_images_same_bytes_whatever_the_archive(self, tmp_path: Path) -> None:
        files = dataset()
        shuffled = dict(reversed(list(files.items())))
        results = [
            prepared_from(archive_of(kind, tmp_path / f"{i}.{kind}", order, mtime), tmp_path / f"out{i}")
            for i, (kind, order, mtime) in enumerate(
                [("zip", files, 1), ("tar", shuffled, 2), ("tar.gz", files, 3), ("zip", shuffled, 4)]
            )
        ]
        assert len({r.sha256 for r in results}) == 1
        assert len({r.preview_sha256 for r in results}) == 1
        assert len({r.images_tar.read_bytes() for r in results}) == 1

    def test_nothing_usable_names_what_was_skipped(self, tmp_path: Path) -> None:
        path = archive_of("zip", tmp_path / "a.zip", BAD)
        with pytest.raises(PreparationFailed) as caught:
            prepared_from(path, tmp_path / "out")
        assert str(caught.value) == (
            "no usable image: 5 files skipped (1 damaged image, 1 hidden or macOS metadata file, "
            "1 not a PNG, JPEG or WebP image, 1 not an image file, 1 too small)"
        )
        assert list((tmp_path / "out").iterdir()) == []  # no spool, no half-written tar

    def test_an_empty_archive(self, tmp_path: Path) -> None:
        with pytest.raises(PreparationFailed, match=r"^no usable image: the source holds no files$"):
            prepared_from(archive_of("tar.gz", tmp_path / "a", {}), tmp_path / "out")

    def test_a_damaged_archive_leaves_nothing(self, tmp_path: Path) -> None:
        data = archive_of("tar", tmp_path / "a.tar", every_mode()).read_bytes()
        (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
        with pytest.raises(PreparationFailed, match=r"^the archive is truncated or damaged"):
            prepared_from(tmp_path / "a.tar", tmp_path / "out")
        assert list((tmp_path / "out").iterdir()) == []

    def test_an_earlier_set_is_replaced_whole(self, tmp_path: Path) -> None:
        first = prepared_from(archive_of("zip", tmp_path / "a.zip", {"a.png": every_mode()["rgb.png"]}), tmp_path / "o")
        second = prepared_from(archive_of("zip", tmp_path / "b.zip", every_mode()), tmp_path / "o")
        assert first.sha256 != second.sha256
        assert hashlib.sha256((tmp_path / "o" / "images.tar").read_bytes()).hexdigest() == second.sha256


class TestPreview:
    @staticmethod
    def colours(n: int) -> dict[str, bytes]:
        return {f"{i:03d}.png": encode(solid("RGB", (i, 255 - i, 7), (16, 8)), "PNG") for i in range(n)}

    def test_three_images_one_row(self, tmp_path: Path) -> None:
        result = prepared_from(archive_of("zip", tmp_path / "a.zip", self.colours(3)), tmp_path / "out")
        with Image.open(result.preview) as grid:
            assert (grid.mode, grid.size) == ("RGB", (192, 64))
            assert [grid.getpixel((32 + 64 * i, 32)) for i in range(3)] == [(0, 255, 7), (1, 254, 7), (2, 253, 7)]
        assert result.preview_sha256 == hashlib.sha256(result.preview.read_bytes()).hexdigest()
        assert result.preview_bytes == result.preview.stat().st_size

    def test_the_first_64_by_name_in_8_rows(self, tmp_path: Path) -> None:
        files = dict(reversed(list(self.colours(70).items())))  # they arrive last first
        result = prepared_from(archive_of("tar", tmp_path / "a.tar", files), tmp_path / "out")
        assert result.image_count == 70
        with Image.open(result.preview) as grid:
            assert grid.size == (512, 512)
            cells = [grid.getpixel((32 + 64 * (i % 8), 32 + 64 * (i // 8))) for i in range(64)]
        assert cells == [(i, 255 - i, 7) for i in range(64)]


class TestStreaming:
    def test_each_member_is_read_once_as_it_comes(self, tmp_path: Path) -> None:
        reads: list[str] = []
        handed: list[str] = []

        def members() -> Iterator[Member | Skipped]:
            for i in range(5):
                name = f"{i}.png"
                handed.append(name)
                assert reads == handed[:-1]  # the previous one was read before this one was asked for
                data = encode(solid("L", i * 10, (8, 8)), "PNG")
                yield Member(name, len(data), lambda name=name, data=data: reads.append(name) or data)
            yield Skipped("x.txt", "not an image file")

        progress: list[int] = []
        result = prepare(members(), tmp_path / "out", LIMITS, progress=progress.append)
        assert reads == ["0.png", "1.png", "2.png", "3.png", "4.png"]
        assert (result.image_count, result.skipped, progress[-1]) == (5, 1, 6)
        with tarfile.open(result.images_tar) as tar:
            values = [int(np.asarray(Image.open(tar.extractfile(m)))[0, 0]) for m in tar.getmembers()]  # type: ignore[arg-type]
        assert values == [0, 10, 20, 30, 40]

    def test_a_failing_source_leaves_nothing(self, tmp_path: Path) -> None:
        def members() -> Iterator[Member | Skipped]:
            data = every_mode()["rgb.png"]
            yield Member("a.png", len(data), lambda: data)
            raise PreparationFailed("the source went away")

        with pytest.raises(PreparationFailed, match=r"^the source went away$"):
            prepare(members(), tmp_path / "out", LIMITS)
        assert list((tmp_path / "out").iterdir()) == []
