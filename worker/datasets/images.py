"""One image of a data set: which member names are read at all, and decoding one member's bytes
into what the prepared set keeps.

Decoding is Pillow, restricted to the PNG, JPEG and WebP decoders (a file's format is sniffed from
its bytes, never trusted from its name; anything else is skipped). The header is read first
(`Image.open` is lazy) and the pixel count checked against `Limits.max_image_pixels` before a
single pixel is decoded; Pillow's own decompression-bomb guard is turned into a skip as well.

What the prepared set keeps (contract: every member decodes with plain Pillow to L or RGB):
- an 8-bit L or RGB PNG/JPEG/WebP that needs nothing done keeps its original bytes;
- everything else is converted and stored as PNG: RGBA/LA (and a palette or colour key with
  transparency) composited onto white; P, CMYK and other colour modes to RGB; 1 to L (0/255);
  16-bit (I;16*, and I, which holds 16-bit PNG greys) scaled 0..65535 onto 0..255 (v / 257,
  rounded; Pillow's own `convert("L")` clips at 255 instead); an EXIF orientation applied;
  an animated image's first frame. F (32-bit float) cannot come out of the three decoders: it
  is skipped as an unsupported mode rather than guessed at.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps

from worker.datasets import Limits, Skipped

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
DECODERS = ("PNG", "JPEG", "WEBP")  # the only Pillow plugins a member may be decoded by
KEPT_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}  # original bytes kept as

# Reasons (a reason's category is its text before " (" or ":"; see `reason_category`).
HIDDEN_FILE = "hidden or macOS metadata file"  # counted, but never listed as an example
NOT_AN_IMAGE_FILE = "not an image file"
NOT_AN_IMAGE = "not a PNG, JPEG or WebP image"

MAX_NAME_CHARS = 300  # names in messages and the summary are cut to this
BLOCK_PIXELS = 1 << 20  # pixels the conversions' integer math handles at a time


def reason_category(reason: str) -> str:
    """The part of a reason that the summary counts by: "too small (1x1)" → "too small"."""
    return re.split(r" \(|:", reason, maxsplit=1)[0]


def display_name(name: str) -> str:
    """A member's name as messages and the summary show it: valid UTF-8 (tar names that were not
    are decoded with surrogate escapes), no control characters (a JSON column refuses NUL), a
    leading "./" dropped, at most MAX_NAME_CHARS characters."""
    clean = name.encode("utf-8", "replace").decode("utf-8")
    clean = "".join(c if c.isprintable() else "?" for c in clean)
    while clean.startswith("./"):
        clean = clean[2:]
    return clean if len(clean) <= MAX_NAME_CHARS else clean[: MAX_NAME_CHARS - 1] + "…"


def name_skip_reason(name: str) -> str | None:
    """Why a file of this name is not read at all, or None when it may be an image.

    Hidden files and macOS metadata (`__MACOSX/`, `.DS_Store`, `._x.png`, anything under a
    dot-folder) are HIDDEN_FILE; a name without an image suffix is NOT_AN_IMAGE_FILE (its bytes
    are never read, so a 10 GB CSV costs nothing; the bytes of a name that has the suffix are
    still sniffed, so a text file renamed .png is skipped by `decode_image`)."""
    parts = [p for p in re.split(r"[\\/]", name) if p not in ("", ".")]
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return HIDDEN_FILE
    stem, dot, suffix = parts[-1].rpartition(".") if parts else ("", "", "")
    if not (stem and dot) or f".{suffix.lower()}" not in IMAGE_SUFFIXES:
        return NOT_AN_IMAGE_FILE
    return None


@dataclass(frozen=True)
class Decoded:
    """A member that is kept: the bytes and extension of its prepared-set entry, the 8-bit L or
    RGB image those bytes decode to (oriented), and the mode the file itself had."""

    data: bytes
    ext: str
    image: Image.Image
    mode: str


def decode_image(name: str, data: bytes, limits: Limits) -> Decoded | Skipped:
    """Decode one member, or say why it is skipped. Never raises for any bytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(name, data, limits)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Skipped(name, f"too many pixels (over Pillow's bound of {Image.MAX_IMAGE_PIXELS:,})")
    except Image.UnidentifiedImageError:
        return Skipped(name, NOT_AN_IMAGE)
    except Exception as e:  # hostile bytes make Pillow raise OSError, SyntaxError, ValueError, struct.error...
        return Skipped(name, f"damaged image: {_describe(e)}")


def _decode(name: str, data: bytes, limits: Limits) -> Decoded | Skipped:
    img = Image.open(io.BytesIO(data), formats=DECODERS)  # reads the header only
    width, height = img.size
    if width * height > limits.max_image_pixels:
        return Skipped(name, f"too many pixels ({width}x{height}, over {limits.max_image_pixels:,})")
    if min(width, height) < limits.min_image_side:
        return Skipped(name, f"too small ({width}x{height})")
    mode = img.mode
    img.load()  # the first frame of an animation; raises on a truncated or damaged file
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    animated = getattr(img, "n_frames", 1) > 1
    if (
        img.format in KEPT_EXTENSIONS
        and mode in ("L", "RGB")
        and "transparency" not in img.info
        and orientation == 1
        and not animated
    ):
        return Decoded(data, KEPT_EXTENSIONS[img.format], img, mode)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    converted = to_8bit(img)
    if converted is None:
        return Skipped(name, f"unsupported image mode ({mode})")
    buffer = io.BytesIO()
    converted.save(buffer, "PNG")
    return Decoded(buffer.getvalue(), "png", converted, mode)


def to_8bit(img: Image.Image) -> Image.Image | None:
    """The image as 8-bit L or RGB (see the module's docstring), or None for a mode not handled."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        return sixteen_bit_to_l(img)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return composite_on_white(img)
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    return None


def sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit grey to 8 bits: v · 255 / 65535 = v / 257, rounded half up (65535 → 255, 128 → 0,
    129 → 1). Mode I (32-bit) is clipped to 0..65535 first."""
    values = np.asarray(img)  # (H, W) uint16 (I;16*) or int32 (I)
    out = np.empty(values.shape, dtype=np.uint8)
    for rows in _row_blocks(values.shape):
        block = np.clip(values[rows], 0, 65535).astype(np.uint32)
        out[rows] = (block + 128) // 257
    return Image.fromarray(out)


def composite_on_white(img: Image.Image) -> Image.Image:
    """Alpha (or a palette's / colour key's transparency) composited onto white:
    out = c · a + 255 · (1 − a) with a = alpha / 255, rounded half up. Grey stays L."""
    grey = img.mode in ("LA", "La", "L", "1")
    arr = np.asarray(img.convert("LA" if grey else "RGBA"))  # (H, W, 2 | 4) uint8
    out = np.empty((*arr.shape[:2], arr.shape[2] - 1), dtype=np.uint8)  # (H, W, 1 | 3)
    for rows in _row_blocks(arr.shape):
        block = arr[rows].astype(np.uint32)
        colour, alpha = block[..., :-1], block[..., -1:]
        out[rows] = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(out[..., 0] if grey else out)


def _row_blocks(shape: tuple[int, ...]) -> Iterator[slice]:
    """Blocks of rows of about BLOCK_PIXELS pixels: the integer math on a 64-megapixel image
    then needs a few MB at a time, not gigabytes."""
    height, width = shape[0], max(shape[1], 1)
    step = max(1, BLOCK_PIXELS // width)
    for top in range(0, height, step):
        yield slice(top, top + step)


def _describe(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 200 else text[:199] + "…"
