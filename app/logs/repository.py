"""Every query on job_log_lines. Lines are read in (attempt, seq) order; a page's cursor is the
last line it holds, written `ATTEMPT.SEQ` and accepted only as this module writes it."""

from __future__ import annotations

import re
import uuid

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.jobs.repository import InvalidCursor
from app.models import JobLogLine

_CURSOR = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})")


def encode_log_cursor(line: JobLogLine) -> str:
    return f"{line.attempt}.{line.seq}"


def decode_log_cursor(cursor: str) -> tuple[int, int]:
    """The (attempt, seq) a cursor from encode_log_cursor names; InvalidCursor for any other text."""
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        raise InvalidCursor("cursor is not one this API returned; list again without it")
    return int(match[1]), int(match[2])


class JobLogRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def page(
        self, job_id: uuid.UUID, *, attempt: int | None, after: tuple[int, int] | None, limit: int
    ) -> list[JobLogLine]:
        """Up to `limit` lines after `after` (attempt, seq), of one attempt or all of them."""
        stmt = select(JobLogLine).where(JobLogLine.job_id == job_id)
        if attempt is not None:
            stmt = stmt.where(JobLogLine.attempt == attempt)
        if after is not None:
            last_attempt, last_seq = after
            stmt = stmt.where(
                or_(
                    JobLogLine.attempt > last_attempt,
                    and_(JobLogLine.attempt == last_attempt, JobLogLine.seq > last_seq),
                )
            )
        stmt = stmt.order_by(JobLogLine.attempt, JobLogLine.seq).limit(limit)
        return list(self.session.scalars(stmt))
