"""The worker's job_attempts rows (GPU-seconds, app/usage/) and the measured rate (ETA), against
the real PostgreSQL: one row per claim, its seen_at renewed by the lease, ended by every way an
attempt ends; and one real tiny training run."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

import torch
from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.jobs.service import job_out, requeue_expired
from app.models import Job, JobAttempt, JobStatus, utcnow
from app.spec import JobSpec
from tests.worker.test_runner import TINY, load, submit
from worker.lease import Lease
from worker.runner import JobRunner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def attempts(factory) -> list[JobAttempt]:
    with session_scope(factory) as s:
        rows = list(s.scalars(select(JobAttempt).order_by(JobAttempt.attempt)))
        s.expunge_all()
        return rows


def job_row(factory, job_id) -> Job:
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        s.expunge_all()
        return job


class TestAttemptRows:
    def test_each_claim_has_a_row_that_every_ending_closes(self, runner: JobRunner, factory) -> None:
        job_id = submit(factory, TINY | {"resources": {"gpus": 2}})
        spec = JobSpec.model_validate(job_row(factory, job_id).spec)

        # 1: claimed, renewed by its lease, then its worker dies (the sweeper finds the lease expired).
        first = runner.claim(job_id)
        [row] = attempts(factory)
        job = job_row(factory, job_id)
        assert (row.job_id, row.owner_id, row.attempt, row.worker) == (job_id, job.owner_id, 1, runner.worker_name)
        assert (row.device, row.gpus, row.outcome, row.ended_at) == (DEVICE, 2, None, None)
        assert row.started_at == row.seen_at == job.started_at
        lease = Lease(job_id, first.attempt, timeout_s=60)
        with session_scope(factory) as s:
            assert lease.write(s, step=5)
        assert attempts(factory)[0].seen_at == job_row(factory, job_id).heartbeat_at > row.started_at
        with session_scope(factory) as s:
            assert requeue_expired(s, utcnow() + timedelta(hours=1)) == [job_id]
        lost = attempts(factory)[0]
        assert (lost.outcome, lost.ended_at) == ("lost", lost.seen_at)
        with session_scope(factory) as s:  # fenced off: its writes change nothing, its row neither
            assert not lease.write(s, step=6)
        assert attempts(factory)[0].seen_at == lost.seen_at

        # 2: a rank dies (worker/ranks.py releases it at once); 3: re-queued for a shutdown.
        second = runner.claim(job_id)
        runner.release_lost(job_id, second.attempt, spec, "rank 1 died")
        third = runner.claim(job_id)
        runner._requeue(job_id, third.attempt, spec)
        # 4: ends for good.
        fourth = runner.claim(job_id)
        runner.finish(job_id, fourth.attempt, status=JobStatus.failed, error="test")
        rows = attempts(factory)
        assert [(r.attempt, r.outcome) for r in rows] == [(1, "lost"), (2, "lost"), (3, "requeued"), (4, "failed")]
        assert rows[1].ended_at == rows[1].seen_at
        assert rows[3].ended_at == job_row(factory, job_id).finished_at
        assert all(r.started_at <= r.seen_at == r.ended_at for r in rows)
        # Each attempt knows when its job entered the queue: the submit, then as each attempt ended.
        assert rows[0].queued_at is not None and rows[0].queued_at <= rows[0].started_at
        assert all(earlier.seen_at <= later.queued_at <= later.started_at for earlier, later in pairwise(rows))

    def test_a_trained_job_measures_its_rate_and_its_gpu_seconds(
        self,
        runner: JobRunner,
        factory,
        clean_db: Settings,
    ) -> None:
        job_id = submit(factory, TINY)
        assert runner.run(job_id) == "succeeded"
        job, points, _ = load(factory, job_id)
        [row] = attempts(factory)
        assert (row.outcome, row.ended_at, row.started_at) == ("succeeded", job.finished_at, job.started_at)
        # The rate of the latest point: images/s over images per step.
        assert job.steps_per_s == points[-1].images_per_s / TINY["training"]["batch_size"]
        with session_scope(factory) as s:
            shown = job_out(s, s.get(Job, job_id), clean_db)
        assert shown.gpu_seconds == round((row.ended_at - row.started_at).total_seconds(), 3) > 0
        assert shown.eta_seconds is None  # not running
