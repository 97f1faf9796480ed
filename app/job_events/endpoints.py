"""GET /v1/jobs/{id}/training-events: what happened to the job's runs that its owner should know of.

(`/v1/jobs/{id}/events` is the live Server-Sent Events stream, which carries these too, as
`training_event`.)
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import CurrentUser, SessionDep
from app.job_events.repository import JobEventRepository
from app.job_events.schemas import JobEventOut, JobEventPage
from app.jobs import service
from app.openapi import AUTHENTICATED, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["training events"], responses=AUTHENTICATED)


@router.get("/{job_id}/training-events", response_model=JobEventPage, responses=error_responses(404, 422))
def list_training_events(
    job_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    after_id: Annotated[int, Query(ge=0, le=2**63 - 1, description="`next_after_id` of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobEventPage:
    """The job's training events, oldest first: out-of-memory steps redone with a smaller
    micro-batch, a compile or CUDA-graph capture that failed. At most 100 per attempt."""
    service.get_job(session, job_id, user)  # 404 for an unknown job or another user's
    events = JobEventRepository(session).page(job_id, after_id=after_id, limit=limit + 1)
    more = len(events) > limit
    events = events[:limit]
    return JobEventPage(
        items=[JobEventOut.model_validate(e) for e in events],
        next_after_id=events[-1].id if more else None,
    )
