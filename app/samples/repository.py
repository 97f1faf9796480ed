from __future__ import annotations

import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.models import Sample


class SampleRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def list(self, job_id: uuid.UUID, *, after_step: int = -1) -> list[Sample]:
        stmt = select(Sample).where(Sample.job_id == job_id, Sample.step > after_step).order_by(Sample.step)
        return list(self.session.scalars(stmt))

    def get(self, job_id: uuid.UUID, step: int) -> Sample | None:
        return self.session.get(Sample, (job_id, step))

    def add(self, sample: Sample) -> None:
        self.session.add(sample)

    def drop_after(self, job_id: uuid.UUID, step: int) -> list[Sample]:
        """Delete the grids after `step` (a resumed attempt draws them again); returns the rest."""
        self.session.execute(delete(Sample).where(Sample.job_id == job_id, Sample.step > step))
        return self.list(job_id)
