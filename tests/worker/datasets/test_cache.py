"""The decoded arrays jobs train on: built once from the prepared tar, reused on this host, fetched
from the bucket on another; a missing, damaged or undecodable prepared set is a clear error."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from app.checkpoints.store import LocalStore, S3Store, make_store
from app.config import Settings
from app.datasets.keys import cache_key, prepared_key
from tests.conftest import bucket_keys
from tests.worker.datasets.prepared_sets import encode, gradient, write_prepared_tar
from tests.worker.datasets.sample_images import LIMITS
from worker.datasets import Member
from worker.datasets.cache import STALE_TEMPORARY_S, TrainingImagesError, training_images
from worker.datasets.prepare import prepare

DATASET = "8d0f3c6e-2f6b-4c57-9d7e-4f3a5c1b2e10"
KEY = prepared_key(DATASET)


def images() -> list[tuple[Image.Image, str]]:
    """Landscape and portrait, L and RGB, PNG, JPEG and lossless WebP: what a prepared set holds."""
    return [
        (gradient(20, 10), "PNG"),
        (gradient(10, 30, "L"), "PNG"),
        (gradient(16, 16), "JPEG"),
        (gradient(9, 12), "WEBP"),
        (Image.new("RGB", (8, 8), (255, 0, 0)), "PNG"),
    ]


def reference(items: list[tuple[Image.Image, str]], size: int, channels: int) -> np.ndarray:
    """What training expects, straight from Pillow: each member decoded from its bytes, converted,
    fitted (shorter side to `size`, centre crop, bicubic), as (N, C, H, W)."""
    out = []
    for img, fmt in items:
        decoded = Image.open(io.BytesIO(encode(img, fmt))).convert("L" if channels == 1 else "RGB")
        pixels = np.asarray(ImageOps.fit(decoded, (size, size), method=Image.Resampling.BICUBIC))
        out.append(np.stack([pixels] * channels) if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    return np.stack(out)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "checkpoints")


def leftovers(store: LocalStore) -> list[str]:
    return sorted(p.name for p in store.root.rglob("*.tmp"))


class TestLocalStore:
    @pytest.mark.parametrize("channels", [1, 3])
    def test_decoded_as_training_fits_each_image(self, store: LocalStore, channels: int) -> None:
        sha256 = write_prepared_tar(store.root / KEY, images())
        path = training_images(store, sha256, KEY, 8, channels)
        assert path == store.root / cache_key(sha256, 8, channels)
        array = np.load(path)
        assert array.dtype == np.uint8 and array.shape == (5, channels, 8, 8)
        np.testing.assert_array_equal(array, reference(images(), 8, channels))
        assert (array[4].transpose(1, 2, 0) == ([255, 0, 0] if channels == 3 else [76])).all()  # L = 0.299 R
        assert path.stat().st_mode & 0o777 == 0o644 and leftovers(store) == []

    def test_built_once_then_reused_without_the_tar(self, store: LocalStore) -> None:
        sha256 = write_prepared_tar(store.root / KEY, images())
        first = training_images(store, sha256, KEY, 8, 3)
        before, built = first.stat().st_mtime_ns, first.read_bytes()
        (store.root / KEY).unlink()  # a second call that decoded would fail now
        again = training_images(store, sha256, KEY, 8, 3)
        assert again == first and again.read_bytes() == built and again.stat().st_mtime_ns == before
        with pytest.raises(TrainingImagesError, match=rf"{KEY} is missing from storage"):
            training_images(store, sha256, KEY, 16, 3)  # another size is another array: it needs the tar

    def test_a_broken_cached_file_is_built_again(self, store: LocalStore) -> None:
        sha256 = write_prepared_tar(store.root / KEY, images())
        path = store.root / cache_key(sha256, 8, 3)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"\x93NUMPY cut")
        assert training_images(store, sha256, KEY, 8, 3) == path
        np.testing.assert_array_equal(np.load(path), reference(images(), 8, 3))

    def test_a_killed_builders_leftover_goes_a_live_ones_stays(self, store: LocalStore) -> None:
        sha256 = write_prepared_tar(store.root / KEY, images())
        folder = (store.root / cache_key(sha256, 8, 3)).parent
        folder.mkdir(parents=True)
        killed, live = folder / ".8x8x3.npy.k1ll3d.tmp", folder / ".8x8x3.npy.l1v3.tmp"
        killed.write_bytes(b"half an array")
        live.write_bytes(b"being written")
        os.utime(killed, (time.time() - 2 * STALE_TEMPORARY_S,) * 2)
        training_images(store, sha256, KEY, 8, 3)
        assert leftovers(store) == [live.name]

    def test_concurrent_builders_agree(self, store: LocalStore) -> None:
        sha256 = write_prepared_tar(store.root / KEY, images() * 40)
        results: list[Path] = []
        threads = [
            threading.Thread(target=lambda: results.append(training_images(store, sha256, KEY, 8, 3))) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [store.root / cache_key(sha256, 8, 3)] * 4
        np.testing.assert_array_equal(np.load(results[0]), reference(images() * 40, 8, 3))
        assert leftovers(store) == []


class TestWithPrepare:
    def test_a_set_prepared_by_the_worker_decodes(self, store: LocalStore, tmp_path: Path) -> None:
        """The real preparation's tar (worker/datasets/prepare.py: RGBA composited, 16-bit scaled,
        JPEG kept as it came): every member decodes, in order, as training fits it."""
        sources = [
            ("a.png", Image.new("RGBA", (12, 10), (255, 0, 0, 128)), "PNG"),
            ("b.jpg", gradient(16, 12), "JPEG"),
            ("c.png", Image.new("I;16", (10, 10), 65535), "PNG"),
        ]
        members = [
            Member(name, len(data), lambda data=data: data) for name, img, fmt in sources for data in [encode(img, fmt)]
        ]
        prepared = prepare(members, tmp_path / "out", LIMITS)
        (store.root / KEY).parent.mkdir(parents=True)
        prepared.images_tar.rename(store.root / KEY)

        array = np.load(training_images(store, prepared.sha256, KEY, 8, 3))
        assert array.shape == (3, 3, 8, 8)
        assert (array[0].transpose(1, 2, 0) == [255, 127, 127]).all()  # half-transparent red on white
        np.testing.assert_array_equal(array[1], reference([(sources[1][1], "JPEG")], 8, 3)[0])
        assert (array[2] == 255).all()


class TestBrokenPreparedSets:
    def test_missing(self, store: LocalStore) -> None:
        with pytest.raises(TrainingImagesError, match=rf"prepared data set {KEY} is missing from storage"):
            training_images(store, "0" * 64, KEY, 8, 3)

    def test_damaged(self, store: LocalStore) -> None:
        sha256 = write_prepared_tar(store.root / KEY, images())
        tar = store.root / KEY
        tar.write_bytes(tar.read_bytes()[:-1024])
        with pytest.raises(TrainingImagesError, match=r"is damaged: its sha256 does not match the data set's"):
            training_images(store, sha256, KEY, 8, 3)
        assert not (store.root / cache_key(sha256, 8, 3)).exists() and leftovers(store) == []

    @pytest.mark.parametrize("keep", [700, 1100, 2000])  # in a header, in a member's bytes, further on
    def test_cut_short_even_with_a_matching_sha256(self, store: LocalStore, keep: int) -> None:
        write_prepared_tar(store.root / KEY, images())
        tar = store.root / KEY
        tar.write_bytes(tar.read_bytes()[:keep])
        sha256 = hashlib.sha256(tar.read_bytes()).hexdigest()
        with pytest.raises(TrainingImagesError, match=r"images\.tar is not a readable tar|cut short|does not decode"):
            training_images(store, sha256, KEY, 8, 3)
        assert not (store.root / cache_key(sha256, 8, 3)).exists() and leftovers(store) == []

    def test_not_a_tar(self, store: LocalStore) -> None:
        (store.root / KEY).parent.mkdir(parents=True)
        (store.root / KEY).write_bytes(b"PK\x03\x04 a zip, say")
        sha256 = hashlib.sha256((store.root / KEY).read_bytes()).hexdigest()
        with pytest.raises(TrainingImagesError, match=r"images\.tar is not a readable tar"):
            training_images(store, sha256, KEY, 8, 3)

    def test_a_member_that_is_no_image_is_named(self, store: LocalStore) -> None:
        sha256 = write_prepared_tar(store.root / KEY, [images()[0], b"\x89PNG\r\n\x1a\n not really"])
        with pytest.raises(TrainingImagesError, match=r"image 00000001\.png of the prepared data set does not decode"):
            training_images(store, sha256, KEY, 8, 3)
        assert leftovers(store) == []

    @pytest.mark.parametrize("sha256", ["", "../../etc", "A" * 64])
    def test_a_sha256_that_is_none(self, store: LocalStore, sha256: str) -> None:
        with pytest.raises(TrainingImagesError, match=r"has no valid sha256"):
            training_images(store, sha256, KEY, 8, 3)

    def test_an_empty_set(self, store: LocalStore) -> None:
        sha256 = write_prepared_tar(store.root / KEY, [])
        with pytest.raises(TrainingImagesError, match=r"holds no image"):
            training_images(store, sha256, KEY, 8, 3)


class TestS3:
    def test_another_host_fetches_the_array_instead_of_decoding(self, s3_settings: Settings, tmp_path: Path) -> None:
        store = make_store(s3_settings)
        assert isinstance(store, S3Store)
        sha256 = write_prepared_tar(store.root / KEY, images())
        store.publish(store.root / KEY)
        store.discard_scratch(KEY)

        path = training_images(store, sha256, KEY, 8, 3)
        key = cache_key(sha256, 8, 3)
        assert path == store.root / key
        assert f"ckpt/{key}" in bucket_keys(s3_settings)
        assert not (store.root / KEY).exists(), "the fetched tar's scratch copy is gone once decoded"

        store.delete(KEY)  # from now on nobody can decode: the bucket's array is the only way
        other_host = S3Store(tmp_path / "other-host", s3_settings)
        fetched = training_images(other_host, sha256, KEY, 8, 3)
        assert fetched == other_host.root / key and fetched.read_bytes() == path.read_bytes()
        np.testing.assert_array_equal(np.load(fetched), reference(images(), 8, 3))

    def test_a_tar_missing_from_the_bucket(self, s3_settings: Settings) -> None:
        with pytest.raises(TrainingImagesError, match=rf"{KEY} cannot be fetched: .*missing from storage"):
            training_images(make_store(s3_settings), "0" * 64, KEY, 8, 3)
