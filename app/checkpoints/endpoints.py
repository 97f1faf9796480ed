"""Checkpoint listing and downloads. Files are found by job and step in the database, never by
a path from the request; downloads carry the sha256 as ETag and honour Range and If-None-Match
(app/checkpoints/files.py)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy.orm import Session

from app.checkpoints.export import NotACheckpoint, diffusers_pipeline_zip
from app.checkpoints.files import (
    CONDITIONAL_RESPONSES,
    checkpoint_store,
    temporary_file_response,
    verified_file_response,
)
from app.checkpoints.repository import CheckpointName, CheckpointRepository
from app.checkpoints.schemas import CheckpointOut
from app.checkpoints.store import CheckpointFileError, StorageUnavailable
from app.deps import CheckpointStepPath, CurrentUser, SessionDep
from app.jobs import service
from app.models import Checkpoint
from app.openapi import AUTHENTICATED, error_responses
from app.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"], responses=AUTHENTICATED)

_FILE = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The safetensors file; ETag and X-Checksum-SHA256 carry its sha256", "content": _FILE},
    **CONDITIONAL_RESPONSES,
    206: {**CONDITIONAL_RESPONSES[206], "content": _FILE},
    307: {"description": "S3 storage with DDPM_S3_DOWNLOAD=redirect: a presigned URL of the file"},
    **error_responses(404, 410, 422),
}


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut], responses=error_responses(404, 422))
def list_checkpoints(job_id: uuid.UUID, user: CurrentUser, session: SessionDep) -> list[CheckpointOut]:
    service.get_job(session, job_id, user)
    return [CheckpointOut.model_validate(c) for c in CheckpointRepository(session).list(job_id)]


# What a 404 says when a named checkpoint does not exist (yet).
MISSING: dict[int | str, str] = {"latest": "no checkpoint yet", "best": "no evaluated checkpoint"}


def checkpoint_or_404(session: Session, job_id: uuid.UUID, step: int | CheckpointName) -> Checkpoint:
    """The checkpoint a `{step}` path names (`latest`: the newest; `best`: the lowest FID); 404
    saying which is missing. The caller has checked that the user may see the job."""
    checkpoint = CheckpointRepository(session).find(job_id, step)
    if checkpoint is None:
        raise HTTPException(404, detail=f"job {job_id} has {MISSING.get(step, f'no checkpoint at step {step}')}")
    return checkpoint


@router.get("/{job_id}/checkpoints/{step}", response_class=FileResponse, responses=DOWNLOAD_RESPONSES)
def download_checkpoint(
    job_id: uuid.UUID, step: CheckpointStepPath, user: CurrentUser, request: Request, session: SessionDep
) -> Response:
    """The checkpoint's safetensors file; `latest` is the newest, `best` the one with the lowest FID."""
    service.get_job(session, job_id, user)
    checkpoint = checkpoint_or_404(session, job_id, step)
    return verified_file_response(
        request,
        checkpoint.path,
        checkpoint.sha256,
        size_bytes=checkpoint.size_bytes,
        media_type="application/octet-stream",
        filename=f"{job_id}-step-{checkpoint.step:08d}.safetensors",
    )


@router.get(
    "/{job_id}/checkpoints/{step}/export",
    response_class=FileResponse,
    responses={
        200: {
            "description": "A zip of a diffusers pipeline folder (UNet2DModel + DDPMScheduler) that "
            "`DDPMPipeline.from_pretrained` loads",
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(404, 410, 422),
    },
)
def export_checkpoint(
    job_id: uuid.UUID,
    step: CheckpointStepPath,
    user: CurrentUser,
    request: Request,
    session: SessionDep,
    format: Annotated[Literal["diffusers"], Query(description="Only `diffusers` for now")] = "diffusers",
) -> Response:
    """A diffusers pipeline of the checkpoint (`latest`: the newest; `best`: the lowest FID), zipped."""
    job = service.get_job(session, job_id, user)
    checkpoint = checkpoint_or_404(session, job_id, step)
    store = checkpoint_store(request)
    try:
        # S3: a verified temporary copy, gone once the zip holds it.
        with store.local_copy(checkpoint.path, checkpoint.sha256, checkpoint.size_bytes) as weights:
            archive = diffusers_pipeline_zip(weights, JobSpec.model_validate(job.spec))
    except (CheckpointFileError, NotACheckpoint) as exc:
        raise HTTPException(410, detail=str(exc)) from exc
    except StorageUnavailable as exc:
        raise HTTPException(503, detail=str(exc)) from exc
    return temporary_file_response(
        archive, media_type="application/zip", filename=f"{job_id}-step-{checkpoint.step:08d}-diffusers.zip"
    )
