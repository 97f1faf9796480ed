"""GPU-seconds and ETAs: what a job and a user have used, and how long a running job has left.

GPU-seconds of an attempt within a window [since, until) = resources.gpus x
(min(end, until) - max(started_at, since)), never below zero, where `end` is when the attempt
ended or, while it runs, its latest heartbeat (app/usage/repository.py keeps both). A job's
`gpu_seconds` is the sum over all its attempts, all time. Services never commit.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from app.auth.repository import UserRepository
from app.models import Job, JobStatus, User, utcnow
from app.usage.repository import AttemptRepository, AttemptSpan
from app.usage.schemas import UserUsage

DEFAULT_WINDOW = timedelta(days=30)


class InvalidWindow(ValueError):
    """A `since`/`until` the service cannot use: a 422 naming `field`."""

    def __init__(self, field: str, msg: str) -> None:
        super().__init__(msg)
        self.field = field


def gpu_seconds(span: AttemptSpan, since: datetime | None = None, until: datetime | None = None) -> float:
    start = max(span.started_at, since) if since is not None else span.started_at
    end = min(span.end, until) if until is not None else span.end
    return span.gpus * max((end - start).total_seconds(), 0.0)


def jobs_gpu_seconds(session: Session, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, float]:
    """Each job's GPU-seconds over all its attempts (0 for a job never started): one query."""
    used = dict.fromkeys(job_ids, 0.0)
    for span in AttemptRepository(session).spans_of_jobs(job_ids):
        if span.job_id is not None:
            used[span.job_id] += gpu_seconds(span)
    return {job_id: round(seconds, 3) for job_id, seconds in used.items()}


def eta_seconds(job: Job) -> float | None:
    """Seconds a running job needs for its remaining steps at its measured rate (`steps_per_s`,
    from its latest metric point); None when it is not running or nothing is measured yet."""
    rate = job.steps_per_s
    if job.status != JobStatus.running or rate is None or rate <= 0:
        return None
    return round(max(job.total_steps - job.step, 0) / rate, 1)


def usage_window(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    """The window a request names, in UTC: until defaults to now, since to 30 days before it; a
    time without an offset is UTC. InvalidWindow for a time out of range or an empty window."""
    until_utc = _utc("until", until) if until is not None else utcnow()
    if since is not None:
        since_utc = _utc("since", since)
    elif until_utc - datetime.min.replace(tzinfo=UTC) < DEFAULT_WINDOW:
        raise InvalidWindow("until", f"until {until_utc.isoformat()} leaves no room for the default since: give one")
    else:
        since_utc = until_utc - DEFAULT_WINDOW
    if since_utc >= until_utc:
        raise InvalidWindow("since", f"since ({since_utc.isoformat()}) must be before until ({until_utc.isoformat()})")
    return since_utc, until_utc


def _utc(field: str, value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError as exc:  # 0001-01-01T00:00:00+05:00 is before year 1 in UTC
        raise InvalidWindow(field, f"{field} {value.isoformat()} is out of range in UTC") from exc


def usage(session: Session, user: User, since: datetime, until: datetime) -> list[UserUsage]:
    """Each user's use in [since, until): the user's own; an admin's: every user's. Most
    GPU-seconds first, then by name."""
    users = UserRepository(session).list() if user.is_admin else [user]
    owner = None if user.is_admin else user.id
    seconds: dict[uuid.UUID, float] = defaultdict(float)
    attempts: dict[uuid.UUID, int] = defaultdict(int)
    jobs: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
    for span in AttemptRepository(session).spans_between(since, until, owner):
        seconds[span.owner_id] += gpu_seconds(span, since, until)
        attempts[span.owner_id] += 1
        if span.job_id is not None and not span.job_deleted:
            jobs[span.owner_id].add(span.job_id)
    shown = [
        UserUsage(
            user_id=u.id,
            user=u.name,
            gpu_seconds=round(seconds[u.id], 3),
            attempts=attempts[u.id],
            jobs=len(jobs[u.id]),
        )
        for u in users
    ]
    return sorted(shown, key=lambda row: (-row.gpu_seconds, row.user))
