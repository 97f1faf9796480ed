from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from app.models import Job, Sample, SampleRequest, Worker, utcnow


class SampleRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def list(self, job_id: uuid.UUID, *, after_step: int = -1) -> list[Sample]:
        stmt = select(Sample).where(Sample.job_id == job_id, Sample.step > after_step).order_by(Sample.step)
        return list(self.session.scalars(stmt))

    def last_step(self, job_id: uuid.UUID) -> int | None:
        return self.session.scalar(select(func.max(Sample.step)).where(Sample.job_id == job_id))

    def get(self, job_id: uuid.UUID, step: int) -> Sample | None:
        return self.session.get(Sample, (job_id, step))

    def add(self, sample: Sample) -> None:
        self.session.add(sample)

    def drop_after(self, job_id: uuid.UUID, step: int) -> list[Sample]:
        """Delete the grids after `step` (a resumed attempt draws them again); returns the rest."""
        self.session.execute(delete(Sample).where(Sample.job_id == job_id, Sample.step > step))
        return self.list(job_id)

    # --- sample requests: stored, claimed by a worker, ended; sent again when a message is lost
    def claim(self, request_id: uuid.UUID, worker: str) -> tuple[uuid.UUID, int] | None:
        """queued -> running for `worker`; returns (job id, checkpoint step), or None when the
        request is not queued. A conditional update, so a re-delivered task does nothing."""
        claimed = self.session.execute(
            update(SampleRequest)
            .where(SampleRequest.id == request_id, SampleRequest.status == "queued")
            .where(SampleRequest.job_id.in_(_live_jobs()))
            .values(status="running", worker=worker)
            .returning(SampleRequest.job_id, SampleRequest.checkpoint_step)
        ).one_or_none()
        return None if claimed is None else (claimed.job_id, claimed.checkpoint_step)

    def get_request(self, request_id: uuid.UUID) -> SampleRequest | None:
        return self.session.get(SampleRequest, request_id)

    def finish(self, request_id: uuid.UUID, **values: object) -> bool:
        """A request's ending: its status, and its files or error (`values`), stamped finished.
        False when its job was deleted meanwhile: the caller removes the files it stored."""
        result = self.session.execute(
            update(SampleRequest)
            .where(SampleRequest.id == request_id, SampleRequest.job_id.in_(_live_jobs()))
            .values(finished_at=utcnow(), **values)
        )
        return result.rowcount == 1

    def add_request(self, request: SampleRequest) -> SampleRequest:
        self.session.add(request)
        self.session.flush()
        return request

    def requests_needing_dispatch(self, older_than: datetime, limit: int = 100) -> list[SampleRequest]:
        """Queued requests never sent, or sent long ago and still not claimed (message lost)."""
        stmt = (
            select(SampleRequest)
            .where(SampleRequest.status == "queued", SampleRequest.job_id.in_(_live_jobs()))
            .where(or_(SampleRequest.dispatched_at.is_(None), SampleRequest.dispatched_at < older_than))
            .where(SampleRequest.created_at < older_than)
            .order_by(SampleRequest.created_at)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))


def _live_jobs():  # type: ignore[no-untyped-def]
    """The ids of jobs not marked deleted (app/jobs/lifecycle.py)."""
    return select(Job.id).where(Job.deleted_at.is_(None))


def requeue_orphaned_requests(session: Session, seen_after: datetime) -> list[uuid.UUID]:
    """Running sample requests whose worker stopped checking in (killed mid-draw) go back to the
    queue, not yet sent; returns their ids, to be sent again. A slow but live worker keeps its
    request."""
    live = select(Worker.name).where(Worker.seen_at >= seen_after)
    orphaned = (
        update(SampleRequest)
        .where(
            SampleRequest.status == "running", or_(SampleRequest.worker.is_(None), SampleRequest.worker.not_in(live))
        )
        .values(status="queued", worker=None, dispatched_at=None)
        .returning(SampleRequest.id)
    )
    return list(session.scalars(orphaned))
