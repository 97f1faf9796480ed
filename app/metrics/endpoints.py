from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import SessionDep
from app.jobs import service
from app.metrics.repository import MetricRepository
from app.metrics.schemas import MetricPage, MetricPointOut

router = APIRouter(prefix="/v1/jobs", tags=["metrics"])


@router.get("/{job_id}/metrics", response_model=MetricPage)
def list_metrics(
    job_id: uuid.UUID,
    session: SessionDep,
    after_step: Annotated[int, Query(ge=-1)] = -1,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> MetricPage:
    """The loss history in step order: points with step > after_step, at most `limit`."""
    service.get_job(session, job_id)
    points = MetricRepository(session).page(job_id, after_step=after_step, limit=limit + 1)
    more = len(points) > limit
    points = points[:limit]
    return MetricPage(
        items=[MetricPointOut.model_validate(p) for p in points],
        next_after_step=points[-1].step if more else None,
    )
