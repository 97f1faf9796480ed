"""Sample grids drawn from the EMA weights during training, with a fixed seed so that grids of
one job are comparable over time."""

from __future__ import annotations

import uuid
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.responses import FileResponse, Response

from app.checkpoints.endpoints import checkpoint_or_404
from app.checkpoints.files import CONDITIONAL_RESPONSES, verified_file_response
from app.checkpoints.repository import CheckpointRepository
from app.deps import CurrentUser, DispatcherDep, SessionDep, StepPath
from app.jobs import service
from app.models import SampleRequest
from app.openapi import AUTHENTICATED, error_responses
from app.samples import service as samples_service
from app.samples.repository import SampleRepository
from app.samples.schemas import SampleOut, SampleRequestIn, SampleRequestOut
from app.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["samples"], responses=AUTHENTICATED)
# Every file route: Range, If-None-Match, and S3's redirect mode (app/checkpoints/files.py).
_FILE_RESPONSES = {
    **CONDITIONAL_RESPONSES,
    307: {"description": "S3 storage with DDPM_S3_DOWNLOAD=redirect: a presigned URL of the file"},
}


@router.get("/{job_id}/samples", response_model=list[SampleOut], responses=error_responses(404, 422))
def list_samples(job_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> list[SampleOut]:
    service.get_job(session, job_id, user)
    return [SampleOut.of(s) for s in SampleRepository(session).list(job_id)]


@router.get(
    "/{job_id}/samples/{step}.png",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "The sample grid"},
        **_FILE_RESPONSES,
        **error_responses(404, 410, 422),
    },
)
def sample_png(job_id: uuid.UUID, step: StepPath, user: CurrentUser, request: Request, session: SessionDep) -> Response:
    service.get_job(session, job_id, user)
    sample = SampleRepository(session).get(job_id, step)
    if sample is None:
        raise HTTPException(404, detail=f"job {job_id} has no sample grid at step {step}")
    return verified_file_response(
        request, sample.path, sample.sha256, size_bytes=sample.size_bytes, media_type="image/png"
    )


@router.post(
    "/{job_id}/sample",
    status_code=202,
    response_model=SampleRequestOut,
    responses=error_responses(400, 404, 409, 422),
)
def request_samples(
    job_id: uuid.UUID,
    user: CurrentUser,
    session: SessionDep,
    dispatcher: DispatcherDep,
    body: Annotated[SampleRequestIn | None, Body(description="Omitted: every default")] = None,
) -> SampleRequestOut:
    """Draw images from a checkpoint on a worker: a PNG grid and a .npz of the images."""
    job = service.get_job(session, job_id, user)
    body = body or SampleRequestIn()
    if body.checkpoint_step in (None, "latest"):
        checkpoint = CheckpointRepository(session).latest(job_id)
        if checkpoint is None:
            raise HTTPException(409, detail=f"job {job_id} has no checkpoint yet to draw samples from")
    else:
        checkpoint = checkpoint_or_404(session, job_id, body.checkpoint_step)
    timesteps = JobSpec.model_validate(job.spec).diffusion.timesteps
    if body.sampler == "ddpm" and body.steps is not None:
        raise HTTPException(
            422, detail=[{"loc": ["body", "steps"], "msg": "steps is for ddim; ddpm runs all T", "type": "value_error"}]
        )
    steps = timesteps if body.sampler == "ddpm" else min(body.steps or 50, timesteps)
    request = SampleRequest(
        job_id=job_id,
        checkpoint_step=checkpoint.step,
        count=body.count,
        seed=body.seed,
        sampler=body.sampler,
        steps=steps,
        status="queued",
    )
    # Sent once SessionDep commits; while the broker is away it stays queued for the sweeper.
    return SampleRequestOut.of(samples_service.queue_request(session, dispatcher, request))


def _own_request(session: SessionDep, job_id: uuid.UUID, request_id: uuid.UUID, user: CurrentUser) -> SampleRequest:
    service.get_job(session, job_id, user)
    request = session.get(SampleRequest, request_id)
    if request is None or request.job_id != job_id:
        raise HTTPException(404, detail=f"job {job_id} has no sample request {request_id}")
    return request


def _result_file(request: Request, r: SampleRequest, path: str | None, sha256: str | None, media: str) -> Response:
    if r.status != "succeeded" or path is None or sha256 is None:
        raise HTTPException(409, detail=f"sample request {r.id} is {r.status}, not succeeded")
    # Named by the request, so the files of several requests can share a download folder.
    name = f"sample-{r.id}{PurePath(path).suffix}"
    return verified_file_response(request, path, sha256, media_type=media, filename=name)


def _result_responses(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {media_type: {}}, "description": description}, **_FILE_RESPONSES, **_RESULT_ERRORS}


_RESULT_ERRORS = error_responses(404, 409, 410, 422)
_PNG, _NPZ = "image/png", "application/octet-stream"


@router.get(
    "/{job_id}/sample/{request_id}.png", response_class=FileResponse, responses=_result_responses(_PNG, "The grid")
)
def sample_request_png(
    job_id: uuid.UUID, request_id: uuid.UUID, user: CurrentUser, session: SessionDep, request: Request
) -> Response:
    r = _own_request(session, job_id, request_id, user)
    return _result_file(request, r, r.png_path, r.png_sha256, _PNG)


@router.get(
    "/{job_id}/sample/{request_id}.npz",
    response_class=FileResponse,
    responses=_result_responses(_NPZ, "numpy .npz, key `images`"),
)
def sample_request_npz(
    job_id: uuid.UUID, request_id: uuid.UUID, user: CurrentUser, session: SessionDep, request: Request
) -> Response:
    r = _own_request(session, job_id, request_id, user)
    return _result_file(request, r, r.npz_path, r.npz_sha256, _NPZ)


# After the .png/.npz routes: Starlette takes the first route whose path matches.
@router.get("/{job_id}/sample/{request_id}", response_model=SampleRequestOut, responses=error_responses(404, 422))
def get_sample_request(
    job_id: uuid.UUID, request_id: uuid.UUID, user: CurrentUser, session: SessionDep
) -> SampleRequestOut:
    return SampleRequestOut.of(_own_request(session, job_id, request_id, user))
