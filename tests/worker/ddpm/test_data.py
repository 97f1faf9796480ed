"""Data sets and the stateless batch indexer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from app.spec import DatasetSpec
from worker.ddpm.data import BatchIndexer, DatasetError, load_images, to_model_range


class TestDigits:
    def test_native_size_grayscale(self) -> None:
        images = load_images(DatasetSpec(image_size=8))
        assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8
        x = to_model_range(images)
        assert x.min().item() == -1.0 and x.max().item() == 1.0

    def test_resized_rgb(self) -> None:
        images = load_images(DatasetSpec(image_size=12, channels=3))
        assert images.shape == (1797, 3, 12, 12)
        assert torch.equal(images[:, 0], images[:, 2])


def _write(path: Path, size: tuple[int, int], color: tuple[int, int, int], fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)


class TestFolder:
    def test_recursive_sorted_fit(self, tmp_path: Path) -> None:
        _write(tmp_path / "b.PNG", (20, 10), (255, 0, 0))
        _write(tmp_path / "a" / "z.jpeg", (10, 30), (0, 0, 255), "JPEG")
        _write(tmp_path / "c.JpG", (8, 8), (0, 255, 0), "JPEG")
        (tmp_path / "notes.txt").write_text("not an image")
        images = load_images(DatasetSpec(kind="folder", path=str(tmp_path), image_size=8, channels=3))
        assert images.shape == (3, 3, 8, 8)
        # sorted by path: a/z.jpeg (blue), b.PNG (red), c.JpG (green)
        assert images[:, :, 4, 4].argmax(dim=1).tolist() == [2, 0, 1]

    def test_grayscale(self, tmp_path: Path) -> None:
        _write(tmp_path / "x.png", (16, 16), (255, 255, 255))
        images = load_images(DatasetSpec(kind="folder", path=str(tmp_path), image_size=4))
        assert torch.equal(images, torch.full((1, 1, 4, 4), 255, dtype=torch.uint8))

    def test_missing_folder(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope"
        with pytest.raises(DatasetError, match=rf"{missing}.*does not exist"):
            load_images(DatasetSpec(kind="folder", path=str(missing)))

    def test_no_images(self, tmp_path: Path) -> None:
        (tmp_path / "readme.md").write_text("hi")
        with pytest.raises(DatasetError, match=rf"{tmp_path}.*no \.png"):
            load_images(DatasetSpec(kind="folder", path=str(tmp_path)))

    def test_corrupt_image_is_named(self, tmp_path: Path) -> None:
        _write(tmp_path / "good.png", (8, 8), (1, 2, 3))
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        with pytest.raises(DatasetError, match=r"cannot read image .*bad\.png"):
            load_images(DatasetSpec(kind="folder", path=str(tmp_path)))

    def test_truncated_image_is_named(self, tmp_path: Path) -> None:
        _write(tmp_path / "cut.jpg", (64, 64), (9, 9, 9), "JPEG")
        data = (tmp_path / "cut.jpg").read_bytes()
        (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
        with pytest.raises(DatasetError, match=r"cut\.jpg"):
            load_images(DatasetSpec(kind="folder", path=str(tmp_path)))

    def test_a_link_to_a_file_outside_the_folder_refuses_the_data_set(self, tmp_path: Path) -> None:
        folder, secret = tmp_path / "set", tmp_path / "elsewhere" / "secret.png"
        _write(folder / "ok.png", (8, 8), (1, 2, 3))
        _write(secret, (8, 8), (4, 5, 6))
        (folder / "leak.png").symlink_to(secret)
        with pytest.raises(DatasetError, match=rf"leak\.png .*resolves to {secret}, outside the folder"):
            load_images(DatasetSpec(kind="folder", path=str(folder)))

    def test_links_inside_the_folder_are_read(self, tmp_path: Path) -> None:
        folder = tmp_path / "set"
        _write(folder / "real" / "a.png", (8, 8), (255, 255, 255))
        (folder / "alias.png").symlink_to(folder / "real" / "a.png")
        link = tmp_path / "via-link"  # the folder itself reached through a link
        link.symlink_to(folder)
        assert load_images(DatasetSpec(kind="folder", path=str(link), image_size=4)).shape == (2, 1, 4, 4)


class TestBatchIndexer:
    def test_pure_function_of_seed_and_step(self) -> None:
        a, b = BatchIndexer(10, 4, seed=3), BatchIndexer(10, 4, seed=3)
        forward = [a.indices(s).tolist() for s in range(8)]
        backward = [b.indices(s).tolist() for s in reversed(range(8))][::-1]
        assert forward == backward
        assert BatchIndexer(10, 4, seed=4).indices(0).tolist() != forward[0]

    def test_epochs_are_permutations_wrapping_across_batches(self) -> None:
        indexer = BatchIndexer(10, 4, seed=0)
        flat = torch.cat([indexer.indices(s) for s in range(5)])  # positions 0..19 = two epochs
        assert torch.equal(flat[:10], indexer.permutation(0))
        assert torch.equal(flat[10:], indexer.permutation(1))
        assert sorted(flat[:10].tolist()) == list(range(10))

    def test_batch_larger_than_data(self) -> None:
        indexer = BatchIndexer(3, 7, seed=0)
        batch = indexer.indices(1)  # positions 7..13: epochs 2, 3, 4
        expected = torch.cat([indexer.permutation(2)[1:], indexer.permutation(3), indexer.permutation(4)[:2]])
        assert torch.equal(batch, expected)
