from __future__ import annotations

import math
import uuid
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.models import Checkpoint, Evaluation

# A checkpoint by name: `latest` is the newest, `best` the one whose evaluation has the lowest FID.
CheckpointName = Literal["latest", "best"]


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

    def best(self, job_id: uuid.UUID) -> Checkpoint | None:
        """The kept checkpoint whose evaluation has the lowest finite FID (ties: the earliest step);
        None when no kept checkpoint was evaluated."""
        stmt = (
            select(Checkpoint)
            .join(Evaluation, (Evaluation.job_id == Checkpoint.job_id) & (Evaluation.step == Checkpoint.step))
            # Below infinity: PostgreSQL sorts NaN above every number, and neither is a measurement.
            .where(Checkpoint.job_id == job_id, Evaluation.fid < math.inf)
            .order_by(Evaluation.fid, Checkpoint.step)
            .limit(1)
        )
        return self.session.scalars(stmt).one_or_none()

    def find(self, job_id: uuid.UUID, step: int | CheckpointName) -> Checkpoint | None:
        """The checkpoint at `step`, or the one a name stands for."""
        if step == "latest":
            return self.latest(job_id)
        if step == "best":
            return self.best(job_id)
        return self.get(job_id, step)

    def add(self, checkpoint: Checkpoint) -> None:
        self.session.add(checkpoint)

    def remove_older_than_newest(
        self, job_id: uuid.UUID, keep: int, *, also_keep: int | None = None
    ) -> list[Checkpoint]:
        """Delete all but the newest `keep` rows and the row at step `also_keep` (the best one,
        with training.keep_best); returns the removed rows (their files are deleted by the caller
        only after this is committed)."""
        stmt = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()).offset(keep)
        old = [c for c in self.session.scalars(stmt) if c.step != also_keep]
        if old:
            self.session.execute(
                delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step.in_([c.step for c in old]))
            )
        return old
