from __future__ import annotations

import uuid

from sqlalchemy import func, select
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
