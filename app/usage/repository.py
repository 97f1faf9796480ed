"""Every query on job_attempts. Nothing here commits: the caller's unit of work does.

An attempt's row follows its claim: written in the claim's transaction, `seen_at` renewed by every
write of its lease (the heartbeat included, so it equals the job's `heartbeat_at` while it runs),
ended in the transaction that ends it (a final status, a re-queue for shutdown) or, when it is
lost, by whoever releases it, at its last sign of life (`ended_at = seen_at`).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from app.models import Job, JobAttempt, utcnow

LOST = "lost"
REQUEUED = "requeued"


def _end() -> ColumnElement[datetime]:
    """An attempt's end as far as anyone knows: when it ended, or its latest heartbeat while it runs."""
    return func.coalesce(JobAttempt.ended_at, JobAttempt.seen_at)


class AttemptSpan(NamedTuple):
    """What GPU-seconds are computed from: one attempt's GPUs and its time span."""

    owner_id: uuid.UUID
    job_id: uuid.UUID | None  # None once its job was deleted
    gpus: int
    started_at: datetime
    end: datetime  # ended_at, or seen_at (its latest heartbeat) while it runs
    job_deleted: bool  # its job is deleted or being deleted: gone for every reader


class AttemptRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # --- the worker's side ------------------------------------------------------------------
    def start(self, job: Job, attempt: int, *, worker: str, device: str, gpus: int) -> JobAttempt:
        """The row of a claim, in the claim's transaction: it starts when the job did."""
        started = job.started_at or utcnow()
        row = JobAttempt(
            job_id=job.id,
            owner_id=job.owner_id,
            attempt=attempt,
            worker=worker,
            device=device,
            gpus=gpus,
            queued_at=job.queued_at or job.created_at,  # a job stored before 0012: its submit
            started_at=started,
            seen_at=started,
        )
        self.session.add(row)
        return row

    def seen(self, job_id: uuid.UUID, attempt: int, at: datetime) -> None:
        """The attempt is alive at `at` (the caller's fenced write of the job row succeeded)."""
        self.session.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt, JobAttempt.ended_at.is_(None))
            .values(seen_at=at)
        )

    def end(self, job_id: uuid.UUID, attempt: int, outcome: str, at: datetime) -> None:
        """The attempt ended at `at` (a final status, or re-queued for shutdown)."""
        self.session.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt, JobAttempt.ended_at.is_(None))
            .values(ended_at=at, seen_at=at, outcome=outcome)
        )

    def end_lost(self, job_id: uuid.UUID, attempt: int) -> None:
        """A lost attempt (its lease expired, a rank died) ended at its last sign of life."""
        self.session.execute(
            update(JobAttempt)
            .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt, JobAttempt.ended_at.is_(None))
            .values(ended_at=JobAttempt.seen_at, outcome=LOST)
        )

    # --- the API's side ---------------------------------------------------------------------
    def spans_of_jobs(self, job_ids: Collection[uuid.UUID]) -> list[AttemptSpan]:
        """Every attempt of these jobs."""
        if not job_ids:
            return []
        return self._spans(JobAttempt.job_id.in_(job_ids))

    def spans_between(self, since: datetime, until: datetime, owner_id: uuid.UUID | None) -> list[AttemptSpan]:
        """Attempts that ran at some time in [since, until): started before `until` and not
        ended before `since`; one owner's, or (None) everyone's."""
        conditions = [JobAttempt.started_at < until, _end() >= since]
        if owner_id is not None:
            conditions.append(JobAttempt.owner_id == owner_id)
        return self._spans(*conditions)

    def _spans(self, *conditions: ColumnElement[bool]) -> list[AttemptSpan]:
        stmt = (
            select(
                JobAttempt.owner_id,
                JobAttempt.job_id,
                JobAttempt.gpus,
                JobAttempt.started_at,
                _end(),
                Job.deleted_at.is_not(None),
            )
            .outerjoin(Job, Job.id == JobAttempt.job_id)
            .where(*conditions)
        )
        return [AttemptSpan(*row) for row in self.session.execute(stmt)]
