from __future__ import annotations

import uuid

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.models import Evaluation


class EvaluationRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def list(self, job_id: uuid.UUID, *, after_step: int = -1) -> list[Evaluation]:
        stmt = select(Evaluation).where(Evaluation.job_id == job_id, Evaluation.step > after_step)
        return list(self.session.scalars(stmt.order_by(Evaluation.step)))

    def page(self, job_id: uuid.UUID, *, after_step: int, limit: int) -> list[Evaluation]:
        stmt = select(Evaluation).where(Evaluation.job_id == job_id, Evaluation.step > after_step)
        return list(self.session.scalars(stmt.order_by(Evaluation.step).limit(limit)))

    def last_step(self, job_id: uuid.UUID) -> int | None:
        return self.session.scalar(select(func.max(Evaluation.step)).where(Evaluation.job_id == job_id))

    def add(self, evaluation: Evaluation) -> None:
        self.session.add(evaluation)

    def drop_after(self, job_id: uuid.UUID, step: int) -> None:
        """A resumed attempt re-does the steps after its checkpoint: their evaluations go (and
        are measured again)."""
        self.session.execute(delete(Evaluation).where(Evaluation.job_id == job_id, Evaluation.step > step))
