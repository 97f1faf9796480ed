from __future__ import annotations

import uuid

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.models import MetricPoint


class MetricRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def list(self, job_id: uuid.UUID, *, after_step: int = -1) -> list[MetricPoint]:
        stmt = select(MetricPoint).where(MetricPoint.job_id == job_id, MetricPoint.step > after_step)
        return list(self.session.scalars(stmt.order_by(MetricPoint.step)))

    def last_step(self, job_id: uuid.UUID) -> int | None:
        return self.session.scalar(select(func.max(MetricPoint.step)).where(MetricPoint.job_id == job_id))

    def page(self, job_id: uuid.UUID, *, after_step: int, limit: int) -> list[MetricPoint]:
        stmt = (
            select(MetricPoint)
            .where(MetricPoint.job_id == job_id, MetricPoint.step > after_step)
            .order_by(MetricPoint.step)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def replace_all(self, job_id: uuid.UUID, points: list[MetricPoint]) -> None:
        """The job's points, every one of them replaced by `points` (metric retention)."""
        self.session.execute(delete(MetricPoint).where(MetricPoint.job_id == job_id))
        self.session.add_all(points)
