"""Thin routes for /v1/jobs: parse, call the service, shape the answer."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Header, HTTPException, Query, Response, status

from app.deps import DispatcherDep, SessionDep
from app.jobs import service
from app.jobs.repository import InvalidCursor, JobRepository
from app.jobs.schemas import JobOut, JobPage
from app.models import JobStatus
from app.spec import JobSpec

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "A repeat of an earlier request with the same Idempotency-Key"}},
)
def create_job(
    spec: Annotated[JobSpec, Body()],
    session: SessionDep,
    dispatcher: DispatcherDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> JobOut:
    """Queue a training job. `{}` trains the `tiny` model on `digits`. With an `Idempotency-Key`
    header, repeating the request returns the same job (200); the same key with another body is 409."""
    job, created = service.create_job(session, spec, idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
        return JobOut.model_validate(job)
    # Invariant 2: the task is sent only once the row is committed, so a worker always finds it.
    session.commit()
    try:
        dispatcher.send_train(str(job.id))
    except Exception as exc:  # kombu/redis raise many types for "broker unreachable"
        # The job is stored and stays queued; the worker's sweeper sends it again once the
        # broker answers. The client has its job either way.
        log.warning("could not send job %s to the broker (%s); it will be re-sent", job.id, exc)
    else:
        JobRepository(session).mark_dispatched(job.id)
    return JobOut.model_validate(job)


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    status: JobStatus | None = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobPage:
    try:
        jobs, next_cursor = JobRepository(session).list_page(limit=limit, status=status, cursor=cursor)
    except InvalidCursor as exc:
        raise HTTPException(422, detail=[{"loc": ["query", "cursor"], "msg": str(exc), "type": "value_error"}]) from exc
    return JobPage(items=[JobOut.model_validate(j) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: uuid.UUID, session: SessionDep) -> JobOut:
    return JobOut.model_validate(service.get_job(session, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: uuid.UUID, session: SessionDep) -> JobOut:
    return JobOut.model_validate(service.cancel_job(session, job_id))
