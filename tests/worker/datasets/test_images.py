"""worker/datasets/images.py: one member decoded, every mode to 8-bit L or RGB, every bad file a skip."""

from __future__ import annotations

import dataclasses
import io
import random

import numpy as np
import pytest
from PIL import Image

from tests.worker.datasets.sample_images import LIMITS, SIXTEEN_BIT, encode, every_mode, png_with_size, solid
from worker.datasets import Skipped, images
from worker.datasets.images import (
    HIDDEN_FILE,
    NOT_AN_IMAGE,
    NOT_AN_IMAGE_FILE,
    Decoded,
    decode_image,
    display_name,
    name_skip_reason,
    reason_category,
    to_8bit,
)


def decoded(name: str, data: bytes) -> Decoded:
    result = decode_image(name, data, LIMITS)
    assert isinstance(result, Decoded), result
    return result


def pixels(result: Decoded) -> np.ndarray:
    """The pixels the prepared set's bytes decode to with plain Pillow (what training sees)."""
    with Image.open(io.BytesIO(result.data)) as img:
        assert img.mode == result.image.mode
        return np.asarray(img)


class TestKeptAsTheyAre:
    @pytest.mark.parametrize(
        ("name", "ext", "mode"),
        [
            ("l.png", "png", "L"),
            ("rgb.png", "png", "RGB"),
            ("rgb.jpg", "jpg", "RGB"),
            ("l.jpeg", "jpg", "L"),
            ("rgb.webp", "webp", "RGB"),
        ],
    )
    def test_8bit_l_and_rgb_keep_their_bytes(self, name: str, ext: str, mode: str) -> None:
        data = every_mode()[name]
        result = decoded(name, data)
        assert (result.data, result.ext, result.mode, result.image.mode) == (data, ext, mode, mode)

    def test_the_format_comes_from_the_bytes_not_the_name(self) -> None:
        jpeg = every_mode()["rgb.jpg"]
        result = decoded("photo.png", jpeg)
        assert (result.data, result.ext) == (jpeg, "jpg")


class TestConverted:
    def test_rgba_is_composited_onto_white_exactly(self) -> None:
        img = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
        img.putpixel((0, 0), (255, 0, 0, 128))  # 0·128/255 + 255·127/255 = 127.0 → 127
        img.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent: white
        result = decoded("x.png", encode(img, "PNG"))
        assert (result.ext, result.mode, result.image.mode) == ("png", "RGBA", "RGB")
        assert pixels(result)[0, :3].tolist() == [[255, 127, 127], [255, 255, 255], [0, 0, 255]]

    def test_la_stays_grey(self) -> None:
        result = decoded("la.png", every_mode()["la.png"])  # 100·128/255 + 255·127/255 = 177.2
        assert (result.mode, result.image.mode, int(pixels(result)[0, 0])) == ("LA", "L", 177)

    def test_palette_without_and_with_transparency(self) -> None:
        plain = pixels(decoded("p.png", every_mode()["p.png"]))
        see_through = pixels(decoded("p.png", every_mode()["p_transparent.png"]))
        assert plain[0, [0, 11]].tolist() == [[255, 0, 0], [0, 0, 255]]
        assert see_through[0, [0, 11]].tolist() == [[255, 0, 0], [255, 255, 255]]

    def test_a_colour_key_is_transparency_too(self) -> None:
        img = solid("RGB", (0, 0, 0), (8, 8))
        img.putpixel((1, 0), (9, 9, 9))
        result = decoded("key.png", encode(img, "PNG", transparency=(0, 0, 0)))
        assert (result.ext, pixels(result)[0, :2].tolist()) == ("png", [[255, 255, 255], [9, 9, 9]])

    def test_one_bit_becomes_0_or_255(self) -> None:
        img = solid("1", 1, (8, 8))
        img.putpixel((0, 0), 0)
        result = decoded("b.png", encode(img, "PNG"))
        assert (result.mode, result.image.mode, pixels(result)[0, :2].tolist()) == ("1", "L", [0, 255])

    def test_cmyk_becomes_rgb(self) -> None:
        data = every_mode()["cmyk.jpg"]
        result = decoded("c.jpg", data)
        with Image.open(io.BytesIO(data)) as img:
            expected = np.asarray(img.convert("RGB"))
        assert (result.ext, result.mode, result.image.mode) == ("png", "CMYK", "RGB")
        assert np.array_equal(pixels(result), expected)

    def test_16_bit_is_scaled_not_clipped(self) -> None:
        result = decoded("s.png", every_mode()["sixteen.png"])
        assert (result.ext, result.mode, result.image.mode) == ("png", "I;16", "L")
        assert pixels(result)[0].tolist() == [0, 0, 1, 1, 128, 255, 255, 4]
        assert [round(v * 255 / 65535) for v in SIXTEEN_BIT] == [0, 0, 1, 1, 128, 255, 255, 4]

    def test_32_bit_integers_are_clipped_to_16_bits_then_scaled(self) -> None:
        img = Image.fromarray(np.array([[-5, 70_000, 257, 65535]], dtype=np.int32))
        assert img.mode == "I"
        assert np.asarray(to_8bit(img)).tolist() == [[0, 255, 1, 255]]

    def test_block_by_block_math_matches_the_formula(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(images, "BLOCK_PIXELS", 30)  # 13 columns: 2 rows per block, the last one short
        rng = np.random.default_rng(5)
        rgba = rng.integers(0, 256, (9, 13, 4), dtype=np.uint8)
        grey16 = rng.integers(0, 65536, (9, 13), dtype=np.uint16)
        expected_rgb = np.floor(rgba[..., :3] * (rgba[..., 3:] / 255) + 255 * (1 - rgba[..., 3:] / 255) + 0.5)
        assert np.array_equal(np.asarray(images.composite_on_white(Image.fromarray(rgba))), expected_rgb)
        expected_l = np.floor(grey16 / 257 + 0.5)
        assert np.array_equal(np.asarray(images.sixteen_bit_to_l(Image.fromarray(grey16))), expected_l)

    def test_float_images_are_not_guessed_at(self) -> None:
        assert to_8bit(Image.new("F", (8, 8))) is None

    def test_exif_orientation_is_applied(self) -> None:
        img = solid("RGB", (0, 0, 0), (16, 8))
        img.paste((255, 255, 255), (0, 0, 8, 8))  # the left half white
        exif = img.getexif()
        exif[0x0112] = 6  # rotate 90° clockwise to view: the white half goes to the top
        result = decoded("r.jpg", encode(img, "JPEG", exif=exif.tobytes(), quality=95))
        assert (result.ext, result.image.size) == ("png", (8, 16))
        top, bottom = pixels(result)[2, 4], pixels(result)[13, 4]
        assert top.min() > 240 and bottom.max() < 15

    def test_an_animation_keeps_its_first_frame(self) -> None:
        frames = [solid("RGB", (255, 0, 0), (8, 8)), solid("RGB", (0, 255, 0), (8, 8))]
        data = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
        result = decoded("a.png", data)
        with Image.open(io.BytesIO(result.data)) as img:
            assert (getattr(img, "n_frames", 1), img.getpixel((0, 0))) == (1, (255, 0, 0))

    def test_every_mode_decodes_with_plain_pillow_to_l_or_rgb(self) -> None:
        for name, data in every_mode().items():
            with Image.open(io.BytesIO(decoded(name, data).data)) as img:
                assert img.mode in ("L", "RGB"), name


class TestSkipped:
    def test_too_small(self) -> None:
        assert decode_image("dot.png", encode(solid("RGB", 0, (1, 1)), "PNG"), LIMITS) == Skipped(
            "dot.png", "too small (1x1)"
        )
        assert decode_image("thin.png", encode(solid("L", 0, (40, 7)), "PNG"), LIMITS) == Skipped(
            "thin.png", "too small (40x7)"
        )

    def test_pixel_limit_is_checked_from_the_header(self) -> None:
        limits = dataclasses.replace(LIMITS, max_image_pixels=100)
        assert decode_image("big.png", encode(solid("L", 0, (11, 10)), "PNG"), limits) == Skipped(
            "big.png", "too many pixels (11x10, over 100)"
        )
        # 9000x9000 = 81M: ours refuses it (64M) before a pixel is decoded (the data holds 8x8)
        assert decode_image("h.png", png_with_size(9000, 9000), LIMITS) == Skipped(
            "h.png", "too many pixels (9000x9000, over 64,000,000)"
        )

    def test_pillows_decompression_bomb_guard_is_a_skip(self) -> None:
        limits = dataclasses.replace(LIMITS, max_image_pixels=10**12)
        result = decode_image("bomb.png", png_with_size(100_000, 100_000), limits)
        assert result == Skipped("bomb.png", f"too many pixels (over Pillow's bound of {Image.MAX_IMAGE_PIXELS:,})")
        result = decode_image("warn.png", png_with_size(10_000, 10_000), limits)  # 1x..2x: a warning
        assert result == Skipped("warn.png", f"too many pixels (over Pillow's bound of {Image.MAX_IMAGE_PIXELS:,})")

    def test_text_renamed_png_gif_and_bmp_are_not_images(self) -> None:
        for data in (b"hello, world\n" * 20, encode(solid("P", 0, (8, 8)), "GIF"), encode(solid("RGB", 0), "BMP")):
            assert decode_image("x.png", data, LIMITS) == Skipped("x.png", NOT_AN_IMAGE)
        assert decode_image("empty.png", b"", LIMITS) == Skipped("empty.png", NOT_AN_IMAGE)

    def test_a_truncated_image_is_damaged(self) -> None:
        data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)), "PNG")
        result = decode_image("cut.png", data[: len(data) // 2], LIMITS)
        assert isinstance(result, Skipped) and reason_category(result.reason) == "damaged image", result

    def test_random_and_damaged_bytes_never_raise(self) -> None:
        rng = random.Random(13)
        originals = list(every_mode().values())
        for i in range(400):
            data = bytearray(rng.choice(originals))
            if i % 4 == 0:
                data = data[: rng.randrange(len(data))]
            else:
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            result = decode_image("f.png", bytes(data), LIMITS)
            if isinstance(result, Decoded):
                assert result.image.mode in ("L", "RGB")
            else:
                assert isinstance(result, Skipped) and result.reason


class TestNames:
    @pytest.mark.parametrize(
        ("name", "reason"),
        [
            ("a/b.PNG", None),
            ("x.JpEg", None),
            ("y.webp", None),
            ("./z.jpg", None),
            ("notes.txt", NOT_AN_IMAGE_FILE),
            ("png", NOT_AN_IMAGE_FILE),
            ("dir/", NOT_AN_IMAGE_FILE),
            ("pic.gif", NOT_AN_IMAGE_FILE),
            ("__MACOSX/a/._b.png", HIDDEN_FILE),
            (".DS_Store", HIDDEN_FILE),
            ("a/.hidden/b.png", HIDDEN_FILE),
        ],
    )
    def test_name_skip_reason(self, name: str, reason: str | None) -> None:
        assert name_skip_reason(name) == reason

    def test_display_name_is_printable_utf8(self) -> None:
        assert display_name("./a/b\x00c\udcff.png") == "a/b?c?.png"
        assert display_name("x" * 400) == "x" * 299 + "…"

    def test_reason_category(self) -> None:
        assert [reason_category(r) for r in ("too small (1x1)", "damaged image: truncated", "link")] == [
            "too small",
            "damaged image",
            "link",
        ]
