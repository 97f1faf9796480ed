"""Jobs on a user's data set, through the runner against the real PostgreSQL: the claim finds the
prepared set, decodes it once into the cache and trains on it; a data set deleted or broken since
the job was submitted fails the attempt with a reason a person can act on."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from PIL import Image

from app.auth.service import get_or_create_user
from app.checkpoints.store import make_store
from app.config import Settings
from app.datasets.keys import cache_key, prepared_key
from app.db import make_engine, make_sessionmaker, session_scope
from app.models import Dataset
from tests.conftest import bucket_keys
from tests.worker.datasets.prepared_sets import gradient, write_prepared_tar
from tests.worker.test_runner import load, submit
from worker.runner import JobRunner

IMAGES = [(gradient(12 + i, 10), "PNG") for i in range(6)] + [(Image.new("L", (9, 9), 200), "JPEG")]


def ready_dataset(factory, settings: Settings) -> tuple[uuid.UUID, str]:
    """A ready data set of the submitting user, its prepared tar in the (local) store; (id, sha256).
    Its first image is of a colour of its own, so no other test's cached array has its sha256."""
    with session_scope(factory) as s:
        owner = get_or_create_user(s, "owner")
        row = Dataset(owner_id=owner.id, name="gradients", status="uploading", source="upload")
        s.add(row)
        s.flush()
        key = prepared_key(row.id)
        own = (Image.new("RGB", (8, 8), tuple(row.id.bytes[:3])), "PNG")
        sha256 = write_prepared_tar(settings.checkpoint_root / key, [own, *IMAGES])
        row.status, row.prepared_key, row.sha256, row.image_count = "ready", key, sha256, 1 + len(IMAGES)
        return row.id, sha256


def dataset_job(dataset_id: uuid.UUID, **training: object) -> dict:
    return {
        "dataset": {"kind": "dataset", "id": str(dataset_id), "image_size": 8, "channels": 3, "random_flip": True},
        "model": {"preset": "custom", "channels": [16, 32], "norm_groups": 8},  # seconds, not minutes, on a CPU
        "diffusion": {"timesteps": 50},
        "training": {"steps": 10, "batch_size": 4, "log_every": 5, "checkpoint_every": 10, "sample_every": 0}
        | training,
    }


def test_a_job_on_a_ready_data_set_trains_to_success(runner: JobRunner, factory, clean_db: Settings) -> None:
    dataset_id, sha256 = ready_dataset(factory, clean_db)
    job_id = submit(factory, dataset_job(dataset_id))
    assert runner.run(job_id) == "succeeded"
    job, points, ckpts = load(factory, job_id)
    assert (job.status, job.step, job.error) == ("succeeded", 10, None)
    assert [p.step for p in points] == [5, 10] and [c.step for c in ckpts] == [10]
    cached = np.load(clean_db.checkpoint_root / cache_key(sha256, 8, 3))
    assert cached.shape == (1 + len(IMAGES), 3, 8, 8) and (cached[-1] == 200).all()  # the gray JPEG, fitted

    # A second job on the same set trains from the cached array: the prepared tar is not needed.
    (clean_db.checkpoint_root / prepared_key(dataset_id)).unlink()
    again = submit(factory, dataset_job(dataset_id, steps=5))
    assert runner.run(again) == "succeeded"


def test_with_s3_storage_the_array_is_built_once_for_every_host(s3_settings: Settings, tmp_path) -> None:
    """The prepared tar in the bucket only; the first attempt decodes it and publishes the array,
    a worker on another host (its own scratch root) fetches that array and needs no tar."""
    factory = make_sessionmaker(make_engine(s3_settings))
    dataset_id, sha256 = ready_dataset(factory, s3_settings)
    store = make_store(s3_settings)
    store.publish(s3_settings.checkpoint_root / prepared_key(dataset_id))
    store.discard_scratch(prepared_key(dataset_id))
    assert JobRunner(s3_settings, factory).run(submit(factory, dataset_job(dataset_id))) == "succeeded"
    assert f"ckpt/{cache_key(sha256, 8, 3)}" in bucket_keys(s3_settings)

    store.delete(prepared_key(dataset_id))
    other_host = s3_settings.model_copy(update={"checkpoint_dir": tmp_path / "other-host"})
    assert JobRunner(other_host, factory).run(submit(factory, dataset_job(dataset_id, steps=5))) == "succeeded"
    assert (tmp_path / "other-host" / cache_key(sha256, 8, 3)).is_file()


@pytest.mark.parametrize("status", ["deleted", "preparing", "failed"])
def test_a_data_set_gone_or_not_ready_fails_the_job(
    runner: JobRunner, factory, clean_db: Settings, status: str
) -> None:
    dataset_id, _ = ready_dataset(factory, clean_db)
    job_id = submit(factory, dataset_job(dataset_id))
    with session_scope(factory) as s:  # since the job was submitted (the API refuses both at submit)
        row = s.get(Dataset, dataset_id)
        if status == "deleted":
            s.delete(row)
        else:
            row.status = status
    assert runner.run(job_id) == "failed"
    job, points, _ = load(factory, job_id)
    reason = "was deleted" if status == "deleted" else f"is {status}, not ready to train on"
    assert (job.status, job.error, job.attempt, points) == ("failed", f"data set {dataset_id} {reason}", 1, [])
    assert job.finished_at is not None


def test_a_prepared_set_missing_from_storage_fails_the_job(runner: JobRunner, factory, clean_db: Settings) -> None:
    dataset_id, _ = ready_dataset(factory, clean_db)
    job_id = submit(factory, dataset_job(dataset_id))
    (clean_db.checkpoint_root / prepared_key(dataset_id)).unlink()
    assert runner.run(job_id) == "failed"
    job, _, _ = load(factory, job_id)
    assert job.error == (
        f"data set {dataset_id}: the prepared data set {prepared_key(dataset_id)} is missing from storage"
    )
