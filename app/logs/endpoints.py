"""GET /v1/jobs/{id}/logs: what the worker logged while it ran the job, attempt by attempt."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from app.deps import CurrentUser, SessionDep
from app.jobs import service
from app.jobs.repository import InvalidCursor
from app.logs.repository import JobLogRepository, decode_log_cursor, encode_log_cursor
from app.logs.schemas import LogLineOut, LogPage
from app.openapi import AUTHENTICATED, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["logs"], responses=AUTHENTICATED)


def _invalid(field: str, msg: str) -> HTTPException:
    return HTTPException(422, detail=[{"loc": ["query", field], "msg": msg, "type": "value_error"}])


@router.get("/{job_id}/logs", response_model=LogPage, responses=error_responses(404, 422))
def job_logs(
    job_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    attempt: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="One attempt's lines; default: all")] = None,
    cursor: Annotated[str | None, Query(max_length=32, description="`next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> LogPage:
    """The worker's log lines for the job (rank 0's for a multi-GPU job), in attempt order and
    in the order they were logged; lines arrive about a second after the worker logs them."""
    job = service.get_job(session, job_id, user)
    if attempt is not None and attempt > job.attempt:
        had = f"has had {job.attempt} attempt{'s' if job.attempt != 1 else ''}"
        raise _invalid("attempt", f"job {job_id} {had}; attempt {attempt} has no lines")
    try:
        after = decode_log_cursor(cursor) if cursor is not None else None
    except InvalidCursor as exc:
        raise _invalid("cursor", str(exc)) from exc
    lines = JobLogRepository(session).page(job_id, attempt=attempt, after=after, limit=limit + 1)
    more = len(lines) > limit
    lines = lines[:limit]
    return LogPage(
        items=[LogLineOut.model_validate(line) for line in lines],
        next_cursor=encode_log_cursor(lines[-1]) if more else None,
    )
