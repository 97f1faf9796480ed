"""FID and KID measured during training (the spec's `evaluation` section), in step order."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from app.deps import CurrentUser, SessionDep
from app.evaluations.repository import EvaluationRepository
from app.evaluations.schemas import EvaluationOut
from app.jobs import service
from app.models import MAX_STEP
from app.openapi import AUTHENTICATED, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["evaluations"], responses=AUTHENTICATED)


@router.get("/{job_id}/evaluations", response_model=list[EvaluationOut], responses=error_responses(404, 422))
def list_evaluations(
    job_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    after_step: Annotated[int, Query(ge=-1, le=MAX_STEP)] = -1,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[EvaluationOut]:
    """Evaluations with step > after_step in step order, at most `limit`: pass the last one's
    step as `after_step` for the next page."""
    service.get_job(session, job_id, user)
    rows = EvaluationRepository(session).page(job_id, after_step=after_step, limit=limit)
    return [EvaluationOut.model_validate(e) for e in rows]
