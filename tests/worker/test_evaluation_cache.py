"""The worker's evaluation cache in the checkpoint store (worker/evaluation_cache.py), local and S3."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from app.checkpoints.store import LocalStore, StorageUnavailable, make_store
from app.config import Settings
from tests.conftest import bucket_keys, s3_client
from worker.evaluation_cache import StoreCache


class TestLocalStore:
    def test_files_lie_under_evaluation_in_the_root(self, tmp_path: Path) -> None:
        cache = StoreCache(LocalStore(tmp_path))
        assert cache.load("reference/a.npz") is None
        cache.save("reference/a.npz", b"statistics")
        assert cache.load("reference/a.npz") == b"statistics"
        assert (tmp_path / "evaluation" / "reference" / "a.npz").read_bytes() == b"statistics"

    @pytest.mark.parametrize("name", ["../../etc/passwd", "/abs", ""])
    def test_names_stay_inside(self, tmp_path: Path, name: str) -> None:
        with pytest.raises(ValueError, match="must be relative"):
            StoreCache(LocalStore(tmp_path)).save(name, b"x")

    def test_a_store_that_does_not_answer_is_a_miss(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        class Away(LocalStore):
            def resume_copy(self, key: str) -> Path:
                raise StorageUnavailable("S3 unavailable (test)")

            def publish(self, path: Path, sha256: str | None = None) -> str:
                raise StorageUnavailable("S3 unavailable (test)")

        cache = StoreCache(Away(tmp_path))
        with caplog.at_level(logging.WARNING):
            cache.save("reference/a.npz", b"statistics")  # logged, not raised: the evaluation goes on
            assert cache.load("reference/a.npz") is None
        assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
            "evaluation cache: cannot store evaluation/reference/a.npz",
            "evaluation cache: cannot read evaluation/reference/a.npz",
        ]


def test_s3_keeps_it_in_the_bucket_and_checks_what_it_downloads(s3_settings: Settings) -> None:
    cache = StoreCache(make_store(s3_settings))
    cache.save("networks/n.pt", b"network")
    assert "ckpt/evaluation/networks/n.pt" in bucket_keys(s3_settings)
    shutil.rmtree(s3_settings.checkpoint_root / "evaluation")  # another host: nothing local
    assert cache.load("networks/n.pt") == b"network"
    assert cache.load("networks/absent.pt") is None
    client = s3_client(s3_settings)
    client.put_object(Bucket=s3_settings.s3_bucket, Key="ckpt/evaluation/networks/n.pt", Body=b"swapped")
    assert cache.load("networks/n.pt") is None  # no sha256 of ours on it: not trusted
