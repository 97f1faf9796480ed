"""Sample grids drawn from the EMA weights during training, with a fixed seed so that grids of
one job are comparable over time."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import FileResponse

from app.checkpoints.store import CheckpointFileError, CheckpointStore
from app.deps import CurrentUser, SessionDep
from app.jobs import service
from app.openapi import AUTHENTICATED, error_responses
from app.samples.repository import SampleRepository
from app.samples.schemas import SampleOut

router = APIRouter(prefix="/v1/jobs", tags=["samples"], responses=AUTHENTICATED)


@router.get("/{job_id}/samples", response_model=list[SampleOut], responses=error_responses(404, 422))
def list_samples(job_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> list[SampleOut]:
    service.get_job(session, job_id, user)
    return [SampleOut.of(s) for s in SampleRepository(session).list(job_id)]


@router.get(
    "/{job_id}/samples/{step}.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "The sample grid"}, **error_responses(404, 410, 422)},
)
def sample_png(
    job_id: uuid.UUID,
    step: Annotated[int, Path(ge=0, le=2**31 - 1)],
    user: CurrentUser,
    request: Request,
    session: SessionDep,
) -> FileResponse:
    service.get_job(session, job_id, user)
    sample = SampleRepository(session).get(job_id, step)
    if sample is None:
        raise HTTPException(404, detail=f"job {job_id} has no sample grid at step {step}")
    store: CheckpointStore = request.app.state.checkpoint_store
    try:
        path = store.verified_path(sample.path, sample.size_bytes, sample.sha256)
    except CheckpointFileError as exc:
        raise HTTPException(410, detail=str(exc)) from exc
    return FileResponse(path, media_type="image/png", headers={"ETag": f'"{sample.sha256}"'})
