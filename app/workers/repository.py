"""Every query on the workers table: each worker's sweeper checks in what it offers (seen_at says
it is alive); the API reads the live ones to explain why a job waits. Nothing here commits."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Worker, utcnow
from app.routing import Resources


class WorkerRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def check_in(self, name: str, queue: str, capacity: Resources, device: str) -> Worker:
        """Record (or refresh) a worker's row: what it offers, and that it is alive now."""
        row = self.session.get(Worker, name) or Worker(name=name, started_at=utcnow())
        row.queue, row.gpus, row.gpu_memory_gb, row.device = queue, capacity.gpus, capacity.memory_gib, device
        row.seen_at = utcnow()
        self.session.add(row)
        return row

    def check_out(self, name: str) -> None:
        if (row := self.session.get(Worker, name)) is not None:
            self.session.delete(row)

    def live(self, queue: str, seen_after: datetime) -> list[Worker]:
        """The workers of `queue` (DDPM_QUEUE, the base of their queue names) seen since `seen_after`."""
        return list(self.session.scalars(select(Worker).where(Worker.queue == queue, Worker.seen_at >= seen_after)))
