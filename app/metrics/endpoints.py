from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.deps import CurrentUser, SessionDep
from app.jobs import service
from app.metrics.plot import loss_curve_png
from app.metrics.repository import MetricRepository
from app.metrics.schemas import MetricPage, MetricPointOut
from app.models import MAX_STEP
from app.openapi import AUTHENTICATED, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["metrics"], responses=AUTHENTICATED)

MAX_PLOT_POINTS = 100_000


@router.get("/{job_id}/metrics", response_model=MetricPage, responses=error_responses(404, 422))
def list_metrics(
    job_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    after_step: Annotated[int, Query(ge=-1, le=MAX_STEP)] = -1,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> MetricPage:
    """The loss history in step order: points with step > after_step, at most `limit`."""
    service.get_job(session, job_id, user)
    points = MetricRepository(session).page(job_id, after_step=after_step, limit=limit + 1)
    more = len(points) > limit
    points = points[:limit]
    return MetricPage(
        items=[MetricPointOut.model_validate(p) for p in points],
        next_after_step=points[-1].step if more else None,
    )


@router.get(
    "/{job_id}/loss.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The loss curve"}, **error_responses(404, 422)},
)
def loss_png(
    job_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    log: Annotated[bool, Query(description="Logarithmic loss axis")] = True,
) -> Response:
    """The loss history drawn as a PNG, for a report or a chat."""
    job = service.get_job(session, job_id, user)
    points = MetricRepository(session).page(job_id, after_step=-1, limit=MAX_PLOT_POINTS)
    title = f"{job.name or job_id} · {job.status} · step {job.step}/{job.total_steps}"
    return Response(loss_curve_png(points, title=title, log_scale=log), media_type="image/png")
