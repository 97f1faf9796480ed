"""Every query on the jobs table. Nothing here commits: the caller's unit of work does."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.models import Job, JobStatus, MetricPoint, SampleRequest, utcnow
from app.status import TERMINAL_STATUSES


class InvalidCursor(ValueError):
    """A `cursor` that encode_cursor did not write: the client's fault, a 422 naming it."""


def encode_cursor(job: Job) -> str:
    """The position just after `job` in the newest-first order: its created_at (UTC) and id."""
    return _cursor_text(job.created_at.astimezone(UTC), job.id)


def _cursor_text(created: datetime, job_id: uuid.UUID) -> str:
    raw = json.dumps([created.isoformat(), str(job_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position a cursor from encode_cursor names; InvalidCursor for any other text.

    The client hands the cursor back, so nothing in it is trusted: it must hold a pair of
    strings, an aware timestamp that exists in UTC (`0001-01-01T00:00:00+05:00` does not) and
    a UUID, written exactly as encode_cursor writes them.
    """
    position = _parse_cursor(cursor)
    if position is None or _cursor_text(*position) != cursor:
        raise InvalidCursor("cursor is not one this API returned; list again without it")
    return position


def _parse_cursor(cursor: str) -> tuple[datetime, uuid.UUID] | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        match json.loads(raw):
            case [str(created), str(job_id)]:
                when = datetime.fromisoformat(created)
                return (when.astimezone(UTC), uuid.UUID(job_id)) if when.tzinfo is not None else None
            case _:
                return None
    # Bad base64, UTF-8, JSON, timestamp or UUID are ValueErrors; a time past datetime's range
    # once moved to UTC is an OverflowError.
    except (ValueError, OverflowError):
        return None


class JobRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # --- the API's side: `owner_id` scopes a query to one user's jobs (None: every user's) ------
    def add(self, job: Job) -> Job:
        self.session.add(job)
        self.session.flush()
        return job

    def get(
        self,
        job_id: uuid.UUID,
        *,
        owner_id: uuid.UUID | None = None,
        for_update: bool = False,
        include_deleted: bool = False,
    ) -> Job | None:
        """The job; a deleted one (deleted_at set) is gone for every reader unless `include_deleted`."""
        stmt = select(Job).where(Job.id == job_id)
        if not include_deleted:
            stmt = stmt.where(Job.deleted_at.is_(None))
        if owner_id is not None:
            stmt = stmt.where(Job.owner_id == owner_id)
        if for_update:
            stmt = stmt.with_for_update()
        return self.session.scalars(stmt).one_or_none()

    def get_by_idempotency_key(self, owner_id: uuid.UUID, key: str) -> Job | None:
        stmt = select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key)
        return self.session.scalars(stmt).one_or_none()

    def count_active(self, owner_id: uuid.UUID) -> int:
        """The user's queued and running jobs."""
        stmt = select(func.count()).where(
            Job.owner_id == owner_id, Job.status.in_([JobStatus.queued, JobStatus.running])
        )
        return self.session.scalar(stmt) or 0

    def list_page(
        self, *, owner_id: uuid.UUID | None, limit: int, status: JobStatus | None, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """Newest first; the cursor is the last job of the previous page."""
        stmt = select(Job).where(Job.deleted_at.is_(None))
        stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        if owner_id is not None:
            stmt = stmt.where(Job.owner_id == owner_id)
        if status is not None:
            stmt = stmt.where(Job.status == status)
        if cursor is not None:
            created, job_id = decode_cursor(cursor)
            stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
        jobs = list(self.session.scalars(stmt))
        if len(jobs) > limit:
            return jobs[:limit], encode_cursor(jobs[limit - 1])
        return jobs, None

    def queued_needing_dispatch(self, older_than: datetime, limit: int = 100) -> list[Job]:
        """Queued jobs never sent, or sent long ago and still not claimed (message lost)."""
        stmt = (
            select(Job)
            .where(Job.status == JobStatus.queued)
            .where(or_(Job.dispatched_at.is_(None), Job.dispatched_at < older_than))
            .where(Job.created_at < older_than)
            .order_by(Job.created_at)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    # --- the worker's side: every write is fenced by the attempt number -------------------
    def claim(self, job_id: uuid.UUID, worker: str) -> int | None:
        """queued -> running with a new attempt number; None if the job is not queued.

        A conditional update, so two deliveries of one task cannot both win.
        """
        now = utcnow()
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(
                status=JobStatus.running,
                attempt=Job.attempt + 1,
                worker=worker,
                heartbeat_at=now,
                started_at=now,
                error=None,
            )
            .returning(Job.attempt)
        )
        return result.scalar_one_or_none()

    def fenced_update(self, job_id: uuid.UUID, attempt: int, **values: Any) -> bool:
        """Write to a running job only while `attempt` is current; False when fenced off."""
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.running)
            .values(**values)
        )
        return result.rowcount == 1

    def requeue_for_shutdown(self, job_id: uuid.UUID, attempt: int) -> bool:
        """running -> queued, not yet sent, after a graceful stop: counted in `stops`, so it does
        not count against max_attempts (the next claim is a new attempt, as ever: attempt
        numbers stay unique fencing tokens). False when fenced off."""
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.running)
            .values(status=JobStatus.queued, worker=None, dispatched_at=None, stops=Job.stops + 1)
        )
        return result.rowcount == 1

    def is_cancel_requested(self, job_id: uuid.UUID) -> bool:
        return bool(self.session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    def add_metric_points(self, points: list[MetricPoint]) -> None:
        self.session.add_all(points)

    def drop_metrics_after(self, job_id: uuid.UUID, step: int) -> None:
        """A resumed attempt re-does the steps after its checkpoint: drop their old points."""
        self.session.execute(delete(MetricPoint).where(MetricPoint.job_id == job_id, MetricPoint.step > step))

    def expired_leases(self, expired_before: datetime) -> list[Job]:
        """Running jobs whose lease ran out, locked; rows another sweeper holds are skipped."""
        stmt = (
            select(Job)
            .where(Job.status == JobStatus.running, Job.heartbeat_at < expired_before)
            .with_for_update(skip_locked=True)
        )
        return list(self.session.scalars(stmt))

    def get_running_attempt(self, job_id: uuid.UUID, attempt: int) -> Job | None:
        """The job, locked, while `attempt` is its current running one; None once it is over."""
        stmt = select(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.running)
        return self.session.scalars(stmt.with_for_update()).one_or_none()

    # --- lifecycle: deletion (marked, files removed, row deleted) and metric retention -------
    def deleted_before(self, before: datetime, limit: int = 20) -> list[uuid.UUID]:
        """Jobs marked deleted before `before` whose deletion has not finished (the API that
        marked them crashed, or their storage was away): the sweeper finishes them."""
        stmt = select(Job.id).where(Job.deleted_at < before).order_by(Job.deleted_at).limit(limit)
        return list(self.session.scalars(stmt))

    def sample_request_ids(self, job_id: uuid.UUID) -> list[uuid.UUID]:
        """Every sample request of the job: their files live outside the job's folder."""
        return list(self.session.scalars(select(SampleRequest.id).where(SampleRequest.job_id == job_id)))

    def delete_marked(self, job_id: uuid.UUID) -> bool:
        """The row of a job marked deleted, gone (its metric points, checkpoint, sample, evaluation,
        sample request and log rows with it, by ON DELETE CASCADE; its attempts stay, job_id null)."""
        result = self.session.execute(delete(Job).where(Job.id == job_id, Job.deleted_at.is_not(None)))
        return result.rowcount == 1

    def due_for_downsampling(self, finished_before: datetime, limit: int = 20) -> list[uuid.UUID]:
        """Finished, not deleted jobs that ended before `finished_before` and still keep every point."""
        stmt = (
            select(Job.id)
            .where(Job.status.in_(sorted(TERMINAL_STATUSES)), Job.finished_at < finished_before)
            .where(Job.deleted_at.is_(None), Job.metrics_downsampled_at.is_(None))
            .order_by(Job.finished_at)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def lock_for_downsampling(self, job_id: uuid.UUID) -> Job | None:
        """The job, locked, while it is finished, not deleted and not yet downsampled; None when
        another sweeper holds it or it changed (continued, deleted) since it was listed."""
        stmt = (
            select(Job)
            .where(Job.id == job_id, Job.status.in_(sorted(TERMINAL_STATUSES)))
            .where(Job.deleted_at.is_(None), Job.metrics_downsampled_at.is_(None))
            .with_for_update(skip_locked=True)
        )
        return self.session.scalars(stmt).one_or_none()
