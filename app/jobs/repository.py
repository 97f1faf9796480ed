"""Every query on the jobs table. Nothing here commits: the caller's unit of work does."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, Select, Subquery, and_, case, delete, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.models import Job, JobStatus, MetricPoint, SampleRequest, User, utcnow
from app.status import TERMINAL_STATUSES

# claim_next gives up after this many candidates lost to a race (another claim, a cap reached
# meanwhile); the delivery then claims nothing and the job's end or the sweeper sends another turn.
CLAIM_TRIES = 5


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


class WaitingJob(NamedTuple):
    id: uuid.UUID
    owner_id: uuid.UUID
    priority: int
    gpus: int
    created_at: datetime


class OwnerLoad(NamedTuple):
    gpus: int  # running now, on any queue
    jobs: int
    latest_start: datetime | None  # of any of their jobs; None: never


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

    def queued_needing_dispatch(self, older_than: datetime, limit: int = 100, cap: int = 0) -> list[Job]:
        """Queued jobs never sent, or sent long ago and still not claimed (message lost). With a
        cap (DDPM_MAX_RUNNING_GPUS_PER_USER), not those whose owner is at it: they start when
        one of the owner's jobs ends, which sends them a turn (app/jobs/scheduling.py)."""
        stmt = (
            select(Job)
            .where(Job.status == JobStatus.queued)
            .where(or_(Job.dispatched_at.is_(None), Job.dispatched_at < older_than))
            .where(Job.created_at < older_than)
            .order_by(Job.created_at)
            .limit(limit)
        )
        if cap > 0:
            running = aliased(Job)
            held = select(func.coalesce(func.sum(_gpus(running)), 0)).where(
                running.owner_id == Job.owner_id, running.status == JobStatus.running
            )
            stmt = stmt.where(held.scalar_subquery() + _gpus(Job) <= cap)
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

    # --- scheduling: a delivery is a turn of its queue (app/jobs/scheduling.py) -------------
    def claim_next(
        self, queue: str, worker: str, *, hint: uuid.UUID | None = None, cap: int = 0
    ) -> tuple[uuid.UUID, int] | None:
        """Claim the queue's next job in the claim order (`_claim_order`), one whose owner stays
        within `cap` running GPUs (0: no cap); (job id, attempt), or None when none can start.

        On PostgreSQL the claims of one queue take turns (a transaction-level advisory lock), so
        each sees the ones before it; the owner's row is locked and their running GPUs counted
        again before the update, so claims on two queues never exceed the cap together."""
        if self.session.get_bind().dialect.name == "postgresql":
            self.session.execute(select(func.pg_advisory_xact_lock(func.hashtext(queue))))
        passed_owners: set[uuid.UUID] = set()
        lost: set[uuid.UUID] = set()
        for _ in range(CLAIM_TRIES):
            stmt = _waiting(queue, cap, hint, lambda _: [Job.id, Job.owner_id, _gpus(Job)])
            stmt = stmt.where(Job.owner_id.not_in(passed_owners), Job.id.not_in(lost))
            row = self.session.execute(stmt.limit(1).with_for_update(of=Job, skip_locked=True)).first()
            if row is None:
                return None
            job_id, owner_id, gpus = row
            if cap > 0:
                self.session.execute(select(User.id).where(User.id == owner_id).with_for_update())
                if self.running_gpus([owner_id]).get(owner_id, 0) + gpus > cap:
                    passed_owners.add(owner_id)
                    continue
            attempt = self.claim(job_id, worker)
            if attempt is not None:
                return job_id, attempt
            lost.add(job_id)
        return None

    def next_waiting(self, queue: str, cap: int) -> uuid.UUID | None:
        """The job the queue's next turn would claim among those with no task in the broker
        (dispatched_at null: a turn found nothing for them); None when each has one, or none can
        start."""
        stmt = _waiting(queue, cap, None, lambda _: [Job.id]).where(Job.dispatched_at.is_(None))
        return self.session.scalar(stmt.limit(1))

    def waiting_in(self, queue: str) -> tuple[list[WaitingJob], dict[uuid.UUID, OwnerLoad]]:
        """The queue's waiting jobs, and what each of their owners has running and when one of
        their jobs last started: what the claim order reads (app/jobs/scheduling.py `Places`)."""
        load = _owner_load(queue)
        loads = {
            row.owner_id: OwnerLoad(int(row.gpus), int(row.jobs), row.latest_start)
            for row in self.session.execute(select(load))
        }
        stmt = select(Job.id, Job.owner_id, Job.priority, _gpus(Job), Job.created_at).where(
            Job.status == JobStatus.queued, Job.queue == queue, Job.deleted_at.is_(None)
        )
        return [WaitingJob(*row) for row in self.session.execute(stmt)], loads

    def running_gpus(self, owner_ids: list[uuid.UUID]) -> dict[uuid.UUID, int]:
        """The GPUs (resources.gpus) each of these users' running jobs hold together."""
        stmt = (
            select(Job.owner_id, func.sum(_gpus(Job)))
            .where(Job.owner_id.in_(owner_ids), Job.status == JobStatus.running)
            .group_by(Job.owner_id)
        )
        return {owner: int(total) for owner, total in self.session.execute(stmt)}

    def fenced_update(self, job_id: uuid.UUID, attempt: int, **values: Any) -> bool:
        """Write to a running job only while `attempt` is current; False when fenced off."""
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.running)
            .values(**values)
        )
        return result.rowcount == 1

    def requeue_for_shutdown(self, job_id: uuid.UUID, attempt: int, at: datetime | None = None) -> bool:
        """running -> queued (at `at`, default now), not yet sent, after a graceful stop: counted in
        `stops`, so it does not count against max_attempts (the next claim is a new attempt, as
        ever: attempt numbers stay unique fencing tokens). False when fenced off."""
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.running)
            .values(status=JobStatus.queued, worker=None, dispatched_at=None, stops=Job.stops + 1)
            .values(queued_at=at or utcnow())
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


# --- the claim order ----------------------------------------------------------------------------
def _gpus(job: type[Job]) -> ColumnElement[int]:
    """A job's resources.gpus, read from its stored spec (always filled in: the spec is dumped whole)."""
    return job.spec[("resources", "gpus")].as_integer()


def _owner_load(queue: str) -> Subquery:
    """For each user with a job waiting in `queue`: the GPUs and jobs they have running now (on
    any queue), and when one of their jobs last started (null: never)."""
    other, waiting = aliased(Job), aliased(Job)
    running = other.status == JobStatus.running
    owners = select(waiting.owner_id).where(waiting.status == JobStatus.queued, waiting.queue == queue)
    return (
        select(
            other.owner_id.label("owner_id"),
            func.coalesce(func.sum(case((running, _gpus(other)), else_=0)), 0).label("gpus"),
            func.count(case((running, 1))).label("jobs"),
            func.max(other.started_at).label("latest_start"),
        )
        .where(other.owner_id.in_(owners), other.deleted_at.is_(None))
        .group_by(other.owner_id)
        .subquery("owner_load")
    )


def _waiting(
    queue: str, cap: int, hint: uuid.UUID | None, columns: Callable[[Subquery], list[ColumnElement[Any]]]
) -> Select[Any]:
    """`columns` of the queue's waiting jobs that may start (within the cap), in the claim order."""
    load = _owner_load(queue)
    stmt = (
        select(*columns(load))
        .select_from(Job)
        .outerjoin(load, load.c.owner_id == Job.owner_id)
        .where(Job.status == JobStatus.queued, Job.queue == queue, Job.deleted_at.is_(None))
        .order_by(*_claim_order(load, hint))
    )
    if cap > 0:
        stmt = stmt.where(func.coalesce(load.c.gpus, 0) + _gpus(Job) <= cap)
    return stmt


def _claim_order(load: Subquery, hint: uuid.UUID | None) -> list[ColumnElement[Any]]:
    """Which waiting job starts first: higher priority; then the user with the fewest GPUs (then
    jobs) running; then the user whose latest start is oldest (never started first): users take
    turns; then the delivered job before its owner's others (Celery's order, as before 0012);
    then the oldest job."""
    hinted = [case((Job.id == hint, 0), else_=1)] if hint is not None else []
    return [
        Job.priority.desc(),
        func.coalesce(load.c.gpus, 0),
        func.coalesce(load.c.jobs, 0),
        load.c.latest_start.asc().nulls_first(),
        *hinted,
        Job.created_at,
        Job.id,
    ]
