"""Every query on the datasets table. Nothing here commits: the caller's unit of work does.

`owner_id` scopes the API's queries to one user's data sets (None: every user's, for an admin);
the worker's side (claim, finish) and the sweeper's address a data set by id alone.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.jobs.repository import decode_cursor, encode_cursor
from app.models import Dataset, Job, JobStatus, Worker, utcnow


class DatasetRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    # --- the API's side --------------------------------------------------------------------
    def add(self, dataset: Dataset) -> Dataset:
        self.session.add(dataset)
        self.session.flush()
        return dataset

    def get(
        self, dataset_id: uuid.UUID, *, owner_id: uuid.UUID | None = None, for_update: bool = False
    ) -> Dataset | None:
        stmt = select(Dataset).where(Dataset.id == dataset_id)
        if owner_id is not None:
            stmt = stmt.where(Dataset.owner_id == owner_id)
        if for_update:
            stmt = stmt.with_for_update()
        return self.session.scalars(stmt).one_or_none()

    def list_page(
        self, *, owner_id: uuid.UUID | None, limit: int, status: str | None, cursor: str | None
    ) -> tuple[list[Dataset], str | None]:
        """Newest first; the cursor is the last data set of the previous page (as for jobs)."""
        stmt = select(Dataset).order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit + 1)
        if owner_id is not None:
            stmt = stmt.where(Dataset.owner_id == owner_id)
        if status is not None:
            stmt = stmt.where(Dataset.status == status)
        if cursor is not None:
            created, dataset_id = decode_cursor(cursor)
            stmt = stmt.where(
                or_(Dataset.created_at < created, and_(Dataset.created_at == created, Dataset.id < dataset_id))
            )
        rows = list(self.session.scalars(stmt))
        if len(rows) > limit:
            return rows[:limit], encode_cursor(rows[limit - 1])  # type: ignore[arg-type]
        return rows, None

    def usage(self, owner_id: uuid.UUID) -> tuple[int, int]:
        """(data sets, bytes of storage) the owner holds, for the quota."""
        count, size = self.session.execute(
            select(func.count(), func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.owner_id == owner_id)
        ).one()
        return int(count), int(size)

    def jobs_using(self, dataset_id: uuid.UUID) -> list[uuid.UUID]:
        """Queued or running jobs that train on the data set (it cannot be deleted under them)."""
        stmt = select(Job.id).where(Job.dataset_id == dataset_id, Job.status.in_([JobStatus.queued, JobStatus.running]))
        return list(self.session.scalars(stmt))

    def shares_content(self, sha256: str, except_id: uuid.UUID) -> bool:
        """Another data set has the same prepared content (its cached arrays are shared)."""
        stmt = select(Dataset.id).where(Dataset.sha256 == sha256, Dataset.id != except_id).limit(1)
        return self.session.scalars(stmt).first() is not None

    def delete(self, dataset: Dataset) -> None:
        self.session.delete(dataset)
        self.session.flush()

    def update(self, dataset_id: uuid.UUID, **values: object) -> None:
        self.session.execute(update(Dataset).where(Dataset.id == dataset_id).values(updated_at=utcnow(), **values))

    # --- the worker's side: preparation ------------------------------------------------------
    def claim_preparation(self, dataset_id: uuid.UUID, worker: str) -> Dataset | None:
        """The data set, now marked as prepared by `worker`; None unless it is `preparing`. A
        re-delivered task after a worker died (kill -9) finds it still preparing and prepares it
        again: preparation writes only content-addressed files and ends with one update."""
        claimed = self.session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id, Dataset.status == "preparing")
            .values(worker=worker, updated_at=utcnow())
            .returning(Dataset.id)
        ).one_or_none()
        return None if claimed is None else self.get(dataset_id)

    def finish_preparation(self, dataset_id: uuid.UUID, worker: str, **values: object) -> bool:
        """preparing -> ready | failed (`values` holds the status and the results), only while
        `worker` still holds the preparation; False otherwise (deleted, or handed to another)."""
        done = self.session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id, Dataset.status == "preparing", Dataset.worker == worker)
            .values(prepared_at=utcnow(), updated_at=utcnow(), **values)
            .returning(Dataset.id)
        ).one_or_none()
        return done is not None

    # --- the sweeper's side ------------------------------------------------------------------
    def preparations_needing_dispatch(self, older_than: datetime, limit: int = 100) -> list[Dataset]:
        """Preparing data sets whose task was never sent, or sent long ago and never taken."""
        stmt = (
            select(Dataset)
            .where(Dataset.status == "preparing", Dataset.worker.is_(None))
            .where(or_(Dataset.dispatched_at.is_(None), Dataset.dispatched_at < older_than))
            .where(Dataset.updated_at < older_than)
            .order_by(Dataset.created_at)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))

    def requeue_orphaned_preparations(self, seen_after: datetime) -> list[uuid.UUID]:
        """Preparations whose worker stopped checking in (killed mid-way): free to be sent again."""
        live = select(Worker.name).where(Worker.seen_at >= seen_after)
        orphaned = (
            update(Dataset)
            .where(Dataset.status == "preparing", Dataset.worker.is_not(None), Dataset.worker.not_in(live))
            .values(worker=None, dispatched_at=None)
            .returning(Dataset.id)
        )
        return list(self.session.scalars(orphaned))

    def stale_uploads(self, idle_since: datetime, limit: int = 100) -> list[Dataset]:
        """Uploads that received no byte since `idle_since` (broken off, never resumed)."""
        stmt = (
            select(Dataset)
            .where(Dataset.status == "uploading", Dataset.updated_at < idle_since)
            .order_by(Dataset.updated_at)
            .limit(limit)
        )
        return list(self.session.scalars(stmt))
