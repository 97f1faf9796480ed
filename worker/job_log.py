"""The log lines of one attempt, kept in the database for GET /v1/jobs/{id}/logs.

While an attempt runs, `capture_job_log` puts a handler on the root logger that keeps what the
worker's console shows of it: every record made in the attempt's own thread (the worker's and
the ML core's loggers, warnings, a failure's traceback) and the lease's heartbeat thread. Other
threads (the sweeper, which speaks of other jobs) are left out. Records are buffered and written
by a thread of the handler's own, every `flush_every_s` or `batch` lines and once more when the
attempt ends, so training never waits on the database; an attempt keeps at most `max_lines`
lines, then one line saying the rest were dropped. A failed write is logged on the console and
never reaches training. A multi-GPU attempt keeps rank 0's lines (the rank that runs the attempt).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.models import JobLogLine

log = logging.getLogger(__name__)

LEASE_LOGGER = "worker.lease"  # its heartbeat thread speaks only of the attempt that holds it
MAX_MESSAGE_CHARS = 16_000  # a longer message (a huge traceback) is cut, saying so


class JobLogHandler(logging.Handler):
    def __init__(
        self,
        factory: sessionmaker[Session],
        job_id: uuid.UUID,
        attempt: int,
        *,
        max_lines: int,
        flush_every_s: float = 1.0,
        batch: int = 500,
    ) -> None:
        super().__init__()
        self.factory, self.job_id, self.attempt = factory, job_id, attempt
        self.max_lines, self.flush_every_s, self.batch = max_lines, flush_every_s, batch
        self.thread_id = threading.get_ident()  # the attempt's thread: where it is installed
        self.formatter = logging.Formatter()  # the message, and the traceback of exc_info
        self._pending: list[JobLogLine] = []
        self._lock = threading.Lock()
        self._seq = 0  # lines kept so far (and the next one's seq)
        self._wake, self._stop = threading.Event(), threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name=f"job-log-{job_id}", daemon=True)

    def start(self) -> None:
        self._writer.start()

    def close(self) -> None:
        """Write what is left and stop the writer (at the attempt's end)."""
        self._stop.set()
        self._wake.set()
        if self._writer.is_alive():
            self._writer.join(timeout=30)
        super().close()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread_id and record.name != LEASE_LOGGER:
            return
        try:
            line = self._line(record)
        except Exception:  # a record whose message cannot be formatted: the console shows why
            self.handleError(record)
            return
        with self._lock:
            if self._seq > self.max_lines:
                return  # over the cap, and the line saying so is written
            if self._seq == self.max_lines:
                line.level, line.logger = "WARNING", __name__
                line.message = (
                    f"… truncated: this attempt logged more than {self.max_lines} lines (see the worker's console)"
                )
            line.seq = self._seq
            self._seq += 1
            self._pending.append(line)
            full = len(self._pending) >= self.batch
        if full:
            self._wake.set()

    def _line(self, record: logging.LogRecord) -> JobLogLine:
        message = record.getMessage()
        if record.exc_info or record.stack_info:
            message = self.formatter.format(record)  # message, then the traceback
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + f"… ({len(message) - MAX_MESSAGE_CHARS} more characters)"
        return JobLogLine(
            job_id=self.job_id,
            attempt=self.attempt,
            at=datetime.fromtimestamp(record.created, UTC),
            level=record.levelname[:16],
            logger=record.name[:255],
            message=message,
        )

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            self._flush()
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
        if not lines:
            return
        try:
            with session_scope(self.factory) as session:
                session.add_all(lines)
        except Exception as exc:  # the database is away, or refuses: the lines are lost, training goes on
            log.warning(
                "job %s: %d log lines of attempt %d not stored (%s)", self.job_id, len(lines), self.attempt, exc
            )


@contextmanager
def capture_job_log(
    factory: sessionmaker[Session], job_id: uuid.UUID, attempt: int, max_lines: int, flush_every_s: float = 1.0
) -> Iterator[None]:
    """Keep the attempt's log lines (see the module's doc) while the block runs in this thread."""
    if max_lines <= 0:
        yield
        return
    handler = JobLogHandler(factory, job_id, attempt, max_lines=max_lines, flush_every_s=flush_every_s)
    root = logging.getLogger()
    try:
        handler.start()
        root.addHandler(handler)
    except Exception as exc:  # never let keeping the log stop the training
        log.warning("job %s: attempt %d's log lines are not kept (%s)", job_id, attempt, exc)
        yield
        return
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
