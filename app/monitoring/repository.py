"""The queries a scrape makes: few, short, and bounded (running jobs, the last hour's rows).

Deleted jobs (`deleted_at` set) count nowhere. Distributions cover a recent window (WINDOW) rather
than all history: checkpoint rows are rotated and jobs deleted, so an all-time count read from the
database would go down; a window's distribution is a gauge, exported as a gauge histogram.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from app.models import Checkpoint, Job, JobAttempt, MetricPoint, WebhookAttempt, utcnow
from app.status import JobStatus

WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class RunningJob:
    job_id: uuid.UUID
    gpus: int  # resources.gpus (processes on a CPU worker)
    images_per_s: float | None  # of its latest metric point; None before the first
    mfu: float | None = None  # of its latest metric point; None where the point has none (the CPU)


class MonitoringRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def jobs_by_status(self) -> dict[str, int]:
        """Every status, with 0 for those no job has."""
        rows = self.session.execute(
            select(Job.status, func.count()).where(Job.deleted_at.is_(None)).group_by(Job.status)
        )
        return {status.value: 0 for status in JobStatus} | {status: count for status, count in rows}

    def running_jobs(self) -> list[RunningJob]:
        jobs = self.session.execute(
            select(Job.id, Job.spec).where(Job.status == JobStatus.running, Job.deleted_at.is_(None))
        ).all()
        if not jobs:
            return []
        ids = [job_id for job_id, _ in jobs]
        latest = (
            select(MetricPoint.job_id, func.max(MetricPoint.step).label("step"))
            .where(MetricPoint.job_id.in_(ids))
            .group_by(MetricPoint.job_id)
            .subquery()
        )
        points = {
            job_id: (rate, mfu)
            for job_id, rate, mfu in self.session.execute(
                select(MetricPoint.job_id, MetricPoint.images_per_s, MetricPoint.mfu).join(
                    latest, and_(MetricPoint.job_id == latest.c.job_id, MetricPoint.step == latest.c.step)
                )
            )
        }
        return [RunningJob(job_id, _gpus(spec), *points.get(job_id, (None, None))) for job_id, spec in jobs]

    def queue_waits(self, now: datetime | None = None) -> list[float]:
        """Seconds each attempt started within WINDOW waited in the queue: from when its job last
        entered the queue (a submit, a continue, a shutdown or a lost attempt) to its start."""
        since = (now or utcnow()) - WINDOW
        rows = self.session.execute(
            select(JobAttempt.started_at, JobAttempt.queued_at)
            .join(Job, Job.id == JobAttempt.job_id)
            .where(JobAttempt.started_at >= since, JobAttempt.queued_at.is_not(None), Job.deleted_at.is_(None))
        )
        return [max(0.0, (started - queued).total_seconds()) for started, queued in rows]

    def checkpoint_write_seconds(self, now: datetime | None = None) -> list[float]:
        """`write_seconds` of the checkpoints stored within WINDOW (of jobs not deleted)."""
        since = (now or utcnow()) - WINDOW
        return list(
            self.session.scalars(
                select(Checkpoint.write_seconds)
                .join(Job, Job.id == Checkpoint.job_id)
                .where(Checkpoint.created_at >= since, Checkpoint.write_seconds.is_not(None), Job.deleted_at.is_(None))
            )
        )

    def webhook_failures(self) -> int:
        """Tries of webhook deliveries that got no 2xx answer (an error, a timeout, another status)."""
        failed = or_(WebhookAttempt.status_code.is_(None), ~WebhookAttempt.status_code.between(200, 299))
        return self.session.scalar(select(func.count()).select_from(WebhookAttempt).where(failed)) or 0


def _gpus(spec: dict[str, Any]) -> int:
    return int(spec.get("resources", {}).get("gpus", 1))
