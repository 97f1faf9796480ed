"""An attempt's lease on its job row: the one way a training attempt writes that row.

A claimed attempt owns the row while the row is running and `jobs.attempt` is still its number.
Every write is conditional on that (`JobRepository.fenced_update`) and stamps `heartbeat_at`, which
renews the lease, and the attempt's `job_attempts.seen_at` (GPU-seconds of a running or lost attempt
count up to it). A write that matches no row means a newer attempt owns the job (the sweeper found
the lease expired and re-queued it): the lease is fenced and the attempt writes nothing more. Between
writes a heartbeat thread renews the lease, so a slow step does not look like a dead worker.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.jobs.repository import JobRepository
from app.models import utcnow
from app.usage.repository import AttemptRepository
from worker.ddpm.sink import StopReason, StopTraining

log = logging.getLogger(__name__)


@dataclass
class Lease:
    """Shared between the training thread (the database sink) and the heartbeat thread."""

    job_id: uuid.UUID
    attempt: int
    timeout_s: float  # settings.lease_timeout_s: the sweeper re-queues a job not renewed for this long
    renewed_at: float = field(default_factory=time.monotonic, init=False)
    fenced: bool = field(default=False, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def write(self, session: Session, **values: object) -> bool:
        """Write `values` and a fresh heartbeat to the job row while this attempt owns it. False,
        and fenced from now on, when a newer attempt does. The caller's session_scope commits."""
        now = utcnow()
        if JobRepository(session).fenced_update(self.job_id, self.attempt, heartbeat_at=now, **values):
            AttemptRepository(session).seen(self.job_id, self.attempt, now)  # GPU-seconds run to here
            return True
        self.fenced = True
        return False

    def write_or_stop(self, session: Session, **values: object) -> None:
        """`write` for the training loop: a fenced attempt stops there, rolling back the session."""
        if not self.write(session, **values):
            raise StopTraining(StopReason.fenced, "a newer attempt owns this job")

    def renewed(self) -> None:
        """A write has committed: the lease runs from now."""
        self.renewed_at = time.monotonic()

    def check(self) -> None:
        """Stop the loop if this attempt may not train on: fenced, or unrenewed for too long."""
        if self.fenced:
            raise StopTraining(StopReason.fenced, "a newer attempt owns this job")
        if time.monotonic() - self.renewed_at > self.timeout_s * 0.8:
            # Stop before the lease expires rather than train on unrecorded.
            raise StopTraining(StopReason.lease_lost, "could not renew the lease")

    @contextmanager
    def heartbeat(self, factory: sessionmaker[Session], interval_s: float) -> Iterator[None]:
        """Renew the lease every `interval_s` in a thread, while the block runs."""
        # In a copy of this thread's context: its log lines carry the attempt's job_id (app/log_format.py).
        thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._beat, factory, interval_s), daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(timeout=5)

    def _beat(self, factory: sessionmaker[Session], interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                with session_scope(factory) as session:
                    if not self.write(session):
                        return
                self.renewed()
            except DBAPIError as exc:
                log.warning("job %s: heartbeat failed (%s)", self.job_id, exc.orig)
