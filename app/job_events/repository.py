from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import JobEvent


class JobEventRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, event: JobEvent) -> None:
        self.session.add(event)

    def page(self, job_id: uuid.UUID, *, after_id: int, limit: int) -> list[JobEvent]:
        """The job's events with id > after_id, oldest first (ids grow in the order rows are written)."""
        stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after_id).order_by(JobEvent.id)
        return list(self.session.scalars(stmt.limit(limit)))

    def since_step(self, job_id: uuid.UUID, step: int) -> list[JobEvent]:
        """The job's events at `step` or later, in (step, id) order: what the live stream may still owe."""
        stmt = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.step >= step)
        return list(self.session.scalars(stmt.order_by(JobEvent.step, JobEvent.id)))

    def last(self, job_id: uuid.UUID) -> tuple[int, int] | None:
        """(step, id) of the job's event that comes last in stream order; None before the first."""
        stmt = (
            select(JobEvent.step, JobEvent.id)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.step.desc(), JobEvent.id.desc())
            .limit(1)
        )
        row = self.session.execute(stmt).first()
        return (row.step, row.id) if row else None
