"""Thin routes for /v1/jobs: parse, call the service, shape the answer."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response, status

from app.checkpoints.files import checkpoint_store
from app.db import session_scope
from app.deps import CurrentUser, DispatcherDep, SessionDep, SettingsDep
from app.jobs import lifecycle, service
from app.jobs.repository import InvalidCursor
from app.jobs.schemas import ContinueIn, JobOut, JobPage
from app.models import JobStatus
from app.openapi import AUTHENTICATED, error_responses
from app.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=AUTHENTICATED)

# OpenAPI links: what a client (and schemathesis' stateful tests) can do with a created job.
_JOB_ID = {"job_id": "$response.body#/id"}
CREATED_JOB_LINKS = {
    "GetJob": {"operationId": "get_job", "parameters": _JOB_ID, "description": "The job's status"},
    "CancelJob": {"operationId": "cancel_job", "parameters": _JOB_ID, "description": "Cancel the job"},
    "ListMetrics": {"operationId": "list_metrics", "parameters": _JOB_ID, "description": "Its loss history"},
    "ListCheckpoints": {"operationId": "list_checkpoints", "parameters": _JOB_ID, "description": "Its checkpoints"},
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "A repeat of an earlier request with the same Idempotency-Key"},
        201: {"description": "The job, queued", "links": CREATED_JOB_LINKS},
        **error_responses(400, 409, 413, 422, 429),
    },
)
def create_job(
    spec: Annotated[JobSpec, Body()],
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
) -> JobOut:
    """Queue a training job, owned by the key's user. `{}` trains the `tiny` model on `digits`.
    With an `Idempotency-Key` header, repeating the request returns the same job (200); the same
    key with another body is 409. Over a limit: 422 naming the field; too many jobs: 429."""
    job, created = service.create_job(
        session, spec, owner=user, settings=settings, dispatcher=dispatcher, idempotency_key=idempotency_key
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    # SessionDep commits before the answer goes out, and the job is sent to its queue then.
    return service.job_out(session, job, settings)


@router.get("", response_model=JobPage, responses=error_responses(422))
def list_jobs(
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    status: JobStatus | None = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobPage:
    try:
        jobs, next_cursor = service.list_jobs(session, user, limit=limit, status=status, cursor=cursor)
    except InvalidCursor as exc:
        raise HTTPException(422, detail=[{"loc": ["query", "cursor"], "msg": str(exc), "type": "value_error"}]) from exc
    return JobPage(items=service.jobs_out(session, jobs, settings), next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(404, 422))
def get_job(job_id: uuid.UUID, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> JobOut:
    return service.job_out(session, service.get_job(session, job_id, user), settings)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409, 422))
def cancel_job(job_id: uuid.UUID, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> JobOut:
    return service.job_out(session, service.cancel_job(session, job_id, user), settings)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(404, 409, 422))
def delete_job(job_id: uuid.UUID, user: CurrentUser, request: Request) -> Response:
    """Delete a finished job and everything it owns: its rows, checkpoints, sample grids and drawn
    samples, in every store. 409 while it is queued or running (cancel it first); repeating it is
    a 204 again."""
    factory = request.app.state.sessionmaker
    with session_scope(factory) as session:  # the mark commits here: the job is gone from now on
        lifecycle.mark_deleted(session, job_id, user)
    lifecycle.remove_job(factory, checkpoint_store(request), job_id)  # files, then the row
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/{job_id}/continue", response_model=JobOut, responses=error_responses(400, 404, 409, 422, 429))
def continue_job(
    job_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    body: Annotated[ContinueIn | None, Body(description='{"steps": N}: the new total')] = None,
) -> JobOut:
    """Queue a finished job again to train to `steps` in all, resuming from its latest checkpoint:
    its losses go on as if it had asked for that many steps from the start."""
    service.get_job(session, job_id, user)  # 404 before anything about the body
    if body is None:
        raise HTTPException(
            422, detail=[{"loc": ["body", "steps"], "msg": "Field required", "type": "missing", "input": None}]
        )
    job = lifecycle.continue_job(session, job_id, user, body.steps, settings=settings, dispatcher=dispatcher)
    return service.job_out(session, job, settings)
