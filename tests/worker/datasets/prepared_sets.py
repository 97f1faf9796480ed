"""Prepared sets for tests, written as the contract describes worker/datasets/prepare.py's: an
uncompressed, deterministic tar of `00000000.png|jpg|webp` members that decode to L or RGB."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from PIL import Image

SUFFIX = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def write_prepared_tar(path: Path, images: list[tuple[Image.Image, str] | bytes]) -> str:
    """`images`: (image, "PNG"|"JPEG"|"WEBP") pairs, or raw member bytes (stored as .png). Its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, item in enumerate(images):
            data, suffix = (item, "png") if isinstance(item, bytes) else (encode(*item), SUFFIX[item[1]])
            info = tarfile.TarInfo(f"{i:08d}.{suffix}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """An image whose every pixel differs from its neighbours (so a wrong crop or flip shows)."""
    img = Image.new("RGB", (width, height))
    img.putdata([((7 * x) % 256, (11 * y) % 256, (3 * x + 5 * y) % 256) for y in range(height) for x in range(width)])
    return img.convert(mode)
