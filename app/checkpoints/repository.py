from __future__ import annotations

import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.models import Checkpoint


class CheckpointRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def list(self, job_id: uuid.UUID, *, after_step: int = -1) -> list[Checkpoint]:
        stmt = select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step > after_step)
        return list(self.session.scalars(stmt.order_by(Checkpoint.step)))

    def get(self, job_id: uuid.UUID, step: int) -> Checkpoint | None:
        return self.session.get(Checkpoint, (job_id, step))

    def latest(self, job_id: uuid.UUID) -> Checkpoint | None:
        stmt = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).limit(1)
        return self.session.scalars(stmt).one_or_none()

    def add(self, checkpoint: Checkpoint) -> None:
        self.session.add(checkpoint)

    def remove_older_than_newest(self, job_id: uuid.UUID, keep: int) -> list[Checkpoint]:
        """Delete all but the newest `keep` rows; returns the removed rows (their files are
        deleted by the caller only after this is committed)."""
        old = list(
            self.session.scalars(
                select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).offset(keep)
            )
        )
        if old:
            self.session.execute(
                delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step.in_([c.step for c in old]))
            )
        return old
