"""The runner with DDPM_STORAGE=s3 against a real S3 server (moto on loopback): checkpoints and
grids land in the bucket before their rows, pruned ones go, garbage is collected, and a new
attempt on a host without the files resumes by downloading them."""

from __future__ import annotations

import hashlib
import shutil
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Sample
from tests.conftest import MakeUser, bucket_keys, s3_client
from tests.worker.conftest import expire_lease
from tests.worker.test_runner import TINY, load, submit
from worker.database_sink import DatabaseSink
from worker.runner import JobRunner
from worker.sample_task import draw_requested_samples


@pytest.fixture
def factory(s3_settings: Settings):
    return make_sessionmaker(make_engine(s3_settings))


@pytest.fixture
def runner(s3_settings: Settings, factory) -> JobRunner:
    return JobRunner(s3_settings, factory)


def read_object(settings: Settings, key: str) -> bytes:
    return s3_client(settings).get_object(Bucket=settings.s3_bucket, Key=f"ckpt/{key}")["Body"].read()


def row_keys(factory, job_id: uuid.UUID) -> set[str]:  # type: ignore[no-untyped-def]
    """Every key a checkpoint or sample row of the job points at."""
    _, _, ckpts = load(factory, job_id)
    with session_scope(factory) as s:
        samples = set(s.scalars(select(Sample.path).where(Sample.job_id == job_id)))
    return {key for c in ckpts for key in (c.path, c.state_path)} | samples


def stored_keys(settings: Settings, job_id: uuid.UUID) -> set[str]:
    return {key.removeprefix("ckpt/") for key in bucket_keys(settings) if key.startswith(f"ckpt/{job_id}/")}


def test_checkpoints_and_grids_live_in_the_bucket_and_pruned_ones_go(
    runner: JobRunner, factory, s3_settings: Settings
) -> None:
    spec = TINY | {"training": TINY["training"] | {"checkpoint_every": 10, "keep_checkpoints": 2, "sample_every": 20}}
    job_id = submit(factory, spec)
    assert runner.run(job_id) == "succeeded"
    _, _, ckpts = load(factory, job_id)
    with session_scope(factory) as s:
        samples = list(s.scalars(select(Sample).where(Sample.job_id == job_id).order_by(Sample.step)))
        s.expunge_all()
    assert [c.step for c in ckpts] == [30, 40]
    assert [x.step for x in samples] == [20, 40]
    assert stored_keys(s3_settings, job_id) == row_keys(factory, job_id), "what the rows point at: 10 and 20 pruned"
    for c in ckpts:
        data = read_object(s3_settings, c.path)
        assert (len(data), hashlib.sha256(data).hexdigest()) == (c.size_bytes, c.sha256)
    for x in samples:
        assert hashlib.sha256(read_object(s3_settings, x.path)).hexdigest() == x.sha256
    left = [p for p in (s3_settings.checkpoint_root / str(job_id)).rglob("*") if p.is_file()]
    assert left == [], "scratch copies go once their rows are committed"


def test_a_new_attempt_resumes_from_the_bucket_and_collects_garbage(
    runner: JobRunner, factory, s3_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = TINY | {"training": TINY["training"] | {"steps": 60, "checkpoint_every": 20}}
    straight = submit(factory, spec)
    assert runner.run(straight) == "succeeded"
    _, straight_points, _ = load(factory, straight)

    interrupted = submit(factory, spec)
    original = DatabaseSink.on_log

    def lose_lease_after_step_30(self, point) -> None:  # type: ignore[no-untyped-def]
        original(self, point)
        if point.step == 30 and self.attempt == 1:
            expire_lease(factory, self.job_id)

    monkeypatch.setattr(DatabaseSink, "on_log", lose_lease_after_step_30)
    assert runner.run(interrupted) == "fenced"
    job, _, ckpts = load(factory, interrupted)
    assert (job.status, [c.step for c in ckpts]) == ("queued", [20])
    # Another host: no scratch files at all. And an object no row points at (an upload whose
    # row never committed), which the next attempt must remove.
    shutil.rmtree(s3_settings.checkpoint_root / str(interrupted))
    orphan = f"{interrupted}/attempt-1/step-00000030.safetensors"
    s3_client(s3_settings).put_object(Bucket=s3_settings.s3_bucket, Key=f"ckpt/{orphan}", Body=b"torn")

    assert runner.run(interrupted) == "succeeded"
    job, points, ckpts = load(factory, interrupted)
    assert (job.attempt, job.step) == (2, 60)
    # Resumed at step 20 from the downloaded state: the loss history is the uninterrupted run's.
    assert [(p.step, p.loss) for p in points] == [(p.step, p.loss) for p in straight_points]
    assert [c.step for c in ckpts] == [20, 40, 60]
    resumed = s3_settings.checkpoint_root / ckpts[0].state_path
    assert resumed.read_bytes() == read_object(s3_settings, ckpts[0].state_path), "downloaded to resume"
    assert orphan not in stored_keys(s3_settings, interrupted)
    assert stored_keys(s3_settings, interrupted) == row_keys(factory, interrupted)


def test_a_sample_request_reads_and_writes_the_bucket(
    runner: JobRunner, factory, s3_settings: Settings, make_user: MakeUser
) -> None:
    spec = {
        "dataset": {"image_size": 8},
        "diffusion": {"timesteps": 30},
        "training": {"steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "sample_every": 0},
    }
    with TestClient(create_app(s3_settings), headers=make_user("owner").headers) as client:
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        assert runner.run(uuid.UUID(job_id)) == "succeeded"
        r = client.post(f"/v1/jobs/{job_id}/sample", json={"count": 4, "sampler": "ddim", "steps": 3})
        assert r.status_code == 202, r.text
        request_id = r.json()["id"]
        assert draw_requested_samples(s3_settings, factory, uuid.UUID(request_id)) == "succeeded"
        done = client.get(f"/v1/jobs/{job_id}/sample/{request_id}").json()
        assert done["status"] == "succeeded", done
        png = client.get(done["png_url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert hashlib.sha256(png.content).hexdigest() == png.headers["x-checksum-sha256"]
        assert f"ckpt/sample-requests/{request_id}/grid.png" in bucket_keys(s3_settings)
        assert client.get(done["npz_url"]).status_code == 200
    assert not (s3_settings.checkpoint_root / "sample-requests" / request_id / "grid.png").exists()
