"""A finished job's later life on a real worker (the runner in-process, the real PostgreSQL):
continued to more steps it trains on exactly as a job that had asked for them from the start;
deleted, its files go from every store, and the sweeper finishes a deletion a crash cut short."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from app.auth.service import get_or_create_user
from app.checkpoints.store import make_store
from app.config import Settings
from app.db import session_scope
from app.jobs import lifecycle
from app.models import Checkpoint, Job, JobAttempt, MetricPoint, Sample, SampleRequest
from app.samples.repository import SampleRepository
from tests.conftest import bucket_keys
from tests.worker.test_runner import TINY, load, submit
from worker.runner import JobRunner
from worker.sample_task import draw_requested_samples
from worker.sweeper import finish_deletions

# Log steps divide 20; sample grids fall every 15 steps and at each job's last step: the 20-step
# job draws one at 20, the 40-step job does not (drawing must not disturb training).
CONTINUED = TINY | {"training": TINY["training"] | {"steps": 20, "sample_every": 15, "sample_count": 4}}


def continue_to(factory, job_id: uuid.UUID, steps: int) -> None:  # type: ignore[no-untyped-def]
    with session_scope(factory) as s:
        owner = get_or_create_user(s, "owner")
        lifecycle.continue_job(s, job_id, owner, steps, settings=Settings())


def losses(factory, job_id: uuid.UUID) -> list[tuple[int, float | None]]:  # type: ignore[no-untyped-def]
    return [(p.step, p.loss) for p in load(factory, job_id)[1]]


class TestContinue:
    @pytest.mark.slow
    def test_a_continued_job_has_the_losses_of_one_that_asked_for_the_total_from_the_start(
        self, runner: JobRunner, factory
    ) -> None:
        straight = submit(factory, CONTINUED | {"training": CONTINUED["training"] | {"steps": 40}})
        assert runner.run(straight) == "succeeded"

        job_id = submit(factory, CONTINUED)
        assert runner.run(job_id) == "succeeded"
        continue_to(factory, job_id, 40)
        job = load(factory, job_id)[0]
        assert (job.status, job.total_steps, job.spec["training"]["steps"], job.stops) == ("queued", 40, 40, 1)
        assert job.finished_at is None
        assert runner.run(job_id) == "succeeded"

        job, points, ckpts = load(factory, job_id)
        assert (job.step, job.attempt, job.stops) == (40, 2, 1)
        assert losses(factory, job_id) == losses(factory, straight)
        assert [p.step for p in points] == [10, 20, 30, 40]
        assert [c.step for c in ckpts] == [20, 40]
        with session_scope(factory) as s:
            grids = list(s.scalars(select(Sample.step).where(Sample.job_id == job_id).order_by(Sample.step)))
        assert grids == [15, 20, 30, 40]  # the first run's last step keeps its grid

    def test_a_continued_job_gets_its_attempts_back(self, runner: JobRunner, factory, clean_db: Settings) -> None:
        job_id = submit(factory, TINY | {"training": TINY["training"] | {"steps": 10}})
        with session_scope(factory) as s:  # as if it had failed after using up every attempt
            job = s.get(Job, job_id)
            assert job is not None
            job.status, job.attempt, job.error = "failed", clean_db.max_attempts, "gave up"
        continue_to(factory, job_id, 20)
        assert runner.run(job_id) == "succeeded"
        job = load(factory, job_id)[0]
        used = clean_db.max_attempts
        assert (job.attempt, job.stops, job.step, job.error) == (used + 1, used, 20, None)


def test_deleting_removes_every_file_in_s3_and_the_rows_but_not_the_attempts(s3_settings: Settings) -> None:
    from app.db import make_engine, make_sessionmaker

    factory = make_sessionmaker(make_engine(s3_settings))
    runner = JobRunner(s3_settings, factory)
    job_id = submit(factory, TINY | {"training": TINY["training"] | {"sample_every": 20, "sample_count": 4}})
    assert runner.run(job_id) == "succeeded"
    with session_scope(factory) as s:
        request = SampleRepository(s).add_request(
            SampleRequest(job_id=job_id, checkpoint_step=40, count=2, seed=0, sampler="ddim", steps=3)
        )
        request_id = request.id
        owner = s.get(Job, job_id).owner_id  # type: ignore[union-attr]
    assert draw_requested_samples(s3_settings, factory, request_id) == "succeeded"
    mine = {k for k in bucket_keys(s3_settings) if str(job_id) in k or str(request_id) in k}
    assert len(mine) >= 6  # 2 checkpoints x (weights, state), 2 grids, the request's PNG and .npz

    with session_scope(factory) as s:
        lifecycle.mark_deleted(s, job_id, get_or_create_user(s, "owner"))
    assert finish_deletions(factory, make_store(s3_settings), grace_s=3600) == 0  # too recent for the sweeper
    assert lifecycle.remove_job(factory, make_store(s3_settings), job_id)

    assert not {k for k in bucket_keys(s3_settings) if str(job_id) in k or str(request_id) in k}
    root = s3_settings.checkpoint_root
    assert not (root / str(job_id)).exists() and not (root / "sample-requests" / str(request_id)).exists()
    with session_scope(factory) as s:
        left = [s.scalar(select(func.count()).where(table.job_id == job_id)) for table in (MetricPoint, Checkpoint)]
        assert s.get(Job, job_id) is None and left == [0, 0]
        assert s.scalar(select(func.count()).select_from(SampleRequest).where(SampleRequest.job_id == job_id)) == 0
        assert [a.job_id for a in s.scalars(select(JobAttempt).where(JobAttempt.owner_id == owner))] == [None]


def test_the_sweeper_finishes_a_deletion_the_api_did_not(runner: JobRunner, factory, clean_db: Settings) -> None:
    job_id = submit(factory, TINY)
    assert runner.run(job_id) == "succeeded"
    with session_scope(factory) as s:  # the API marked it and died before removing anything
        lifecycle.mark_deleted(s, job_id, get_or_create_user(s, "owner"))
    assert (clean_db.checkpoint_root / str(job_id)).is_dir()
    assert finish_deletions(factory, make_store(clean_db), grace_s=0) == 1
    assert not (clean_db.checkpoint_root / str(job_id)).exists()
    with session_scope(factory) as s:
        assert s.get(Job, job_id) is None
    assert finish_deletions(factory, make_store(clean_db), grace_s=0) == 0


def test_a_sample_request_of_a_deleted_job_is_not_drawn_and_cannot_finish(
    runner: JobRunner, factory, clean_db: Settings
) -> None:
    job_id = submit(factory, TINY | {"training": TINY["training"] | {"steps": 20}})
    assert runner.run(job_id) == "succeeded"
    with session_scope(factory) as s:
        ids = [
            SampleRepository(s)
            .add_request(SampleRequest(job_id=job_id, checkpoint_step=20, count=2, seed=0, sampler="ddim", steps=3))
            .id
            for _ in range(2)
        ]
        SampleRepository(s).claim(ids[1], "a worker drawing it when the job is deleted")
    with session_scope(factory) as s:
        lifecycle.mark_deleted(s, job_id, get_or_create_user(s, "owner"))
    assert draw_requested_samples(clean_db, factory, ids[0]) == "skipped"
    with session_scope(factory) as s:
        assert SampleRepository(s).finish(ids[1], status="succeeded") is False  # its drawer removes its files
        assert SampleRepository(s).requests_needing_dispatch(older_than=_far_future()) == []


def _far_future():  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from app.models import utcnow

    return utcnow() + timedelta(days=1)
