"""Tiny images of every mode, and zip / tar / tar.gz archives of them, built in memory for the
data set preparation tests (test_archive, test_images, test_prepare)."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from worker.datasets import Limits

LIMITS = Limits(
    max_source_bytes=1 << 30,
    max_unpacked_bytes=1 << 30,
    max_ratio=200.0,
    max_image_pixels=64_000_000,
    min_image_side=8,
)
RED_HALF_ALPHA = (255, 0, 0, 128)  # composited onto white: (255, 127, 127)
SIXTEEN_BIT = [0, 128, 129, 257, 32768, 65534, 65535, 1000]  # → 0, 0, 1, 1, 128, 255, 255, 4


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def solid(mode: str, colour: object, size: tuple[int, int] = (12, 10)) -> Image.Image:
    return Image.new(mode, size, colour)  # type: ignore[arg-type]


def palette_image(transparent: bool) -> Image.Image:
    """P, 12x10: index 0 (red) on the left half, index 1 (blue) on the right; index 1 may be the
    transparent one."""
    img = Image.new("P", (12, 10), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.paste(1, (6, 0, 12, 10))
    if transparent:
        img.info["transparency"] = 1
    return img


def sixteen_bit_png() -> bytes:
    """An I;16 PNG 8x8 whose first row holds SIXTEEN_BIT."""
    values = np.zeros((8, 8), dtype=np.uint16)
    values[0] = SIXTEEN_BIT
    return encode(Image.fromarray(values), "PNG")


def png_with_size(width: int, height: int) -> bytes:
    """A valid 8x8 PNG whose IHDR then claims width x height (its CRC recomputed): a header that
    declares a huge image in a few bytes."""
    data = bytearray(encode(solid("L", 0, (8, 8)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def every_mode() -> dict[str, bytes]:
    """One small file per mode the preparation handles, by member name."""
    return {
        "l.png": encode(solid("L", 77), "PNG"),
        "rgb.png": encode(solid("RGB", (10, 20, 30)), "PNG"),
        "rgba.png": encode(solid("RGBA", RED_HALF_ALPHA), "PNG"),
        "la.png": encode(solid("LA", (100, 128)), "PNG"),
        "p.png": encode(palette_image(transparent=False), "PNG"),
        "p_transparent.png": encode(palette_image(transparent=True), "PNG", transparency=1),
        "one_bit.png": encode(solid("1", 1), "PNG"),
        "cmyk.jpg": encode(solid("CMYK", (0, 255, 0, 0)), "JPEG"),
        "sixteen.png": sixteen_bit_png(),
        "rgb.jpg": encode(solid("RGB", (200, 100, 50)), "JPEG"),
        "l.jpeg": encode(solid("L", 30), "JPEG"),
        "rgb.webp": encode(solid("RGB", (0, 128, 255)), "WEBP", lossless=True),
        "rgba.webp": encode(solid("RGBA", (0, 0, 0, 0)), "WEBP", lossless=True),
    }


def write_zip(path: Path, files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def tar_bytes(files: dict[str, bytes], mtime: int = 1_700_000_000, extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """An uncompressed tar of `files` (regular members), then `extra` members without data."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return buffer.getvalue()


def write_tar(
    path: Path,
    files: dict[str, bytes],
    gz: bool = False,
    mtime: int = 1_700_000_000,
    extra: list[tarfile.TarInfo] | None = None,
) -> Path:
    data = tar_bytes(files, mtime, extra)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info
