from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.checkpoints.schemas import checkpoint_ref
from app.models import Sample, SampleRequest


def sample_url(job_id: uuid.UUID, step: int) -> str:
    return f"/v1/jobs/{job_id}/samples/{step}.png"


class SampleOut(BaseModel):
    step: int
    url: str  # the PNG grid (needs the API key like every /v1 route)
    size_bytes: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, sample: Sample) -> SampleOut:
        return cls(
            step=sample.step,
            url=sample_url(sample.job_id, sample.step),
            size_bytes=sample.size_bytes,
            sha256=sample.sha256,
            created_at=sample.created_at,
        )


# A checkpoint in a sample request's body: a step (a JSON integer), `latest` or `best`.
CheckpointRef = checkpoint_ref(strict=True)


class SampleRequestIn(BaseModel):
    """What to draw: `ddpm` runs the full T-step chain; `ddim` runs `steps` deterministic steps."""

    model_config = ConfigDict(extra="forbid", strict=True)

    count: int = Field(16, ge=1, le=64, description="Images to draw (one grid).")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seeds x_T and the chain's noise.")
    sampler: Literal["ddpm", "ddim"] = Field("ddim", description="`ddpm` (all T steps) or `ddim`.")
    steps: int | None = Field(None, ge=1, le=100_000, description="`ddim` only: steps (default 50, at most T).")
    checkpoint_step: CheckpointRef | None = Field(
        None, description="The checkpoint to draw from: a step, `latest` (the default) or `best` (lowest FID)."
    )


class SampleRequestOut(BaseModel):
    id: uuid.UUID
    job_id: uuid.UUID
    status: Literal["queued", "running", "succeeded", "failed"]
    checkpoint_step: int
    count: int
    seed: int
    sampler: str
    steps: int
    error: str | None
    png_url: str | None  # the grid, once succeeded
    npz_url: str | None  # the images as uint8 (count, H, W, C) under key "images"
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, r: SampleRequest) -> SampleRequestOut:
        base = f"/v1/jobs/{r.job_id}/sample/{r.id}"
        done = r.status == "succeeded"
        return cls(
            id=r.id,
            job_id=r.job_id,
            status=r.status,  # type: ignore[arg-type]
            checkpoint_step=r.checkpoint_step,
            count=r.count,
            seed=r.seed,
            sampler=r.sampler,
            steps=r.steps,
            error=r.error,
            png_url=f"{base}.png" if done else None,
            npz_url=f"{base}.npz" if done else None,
            created_at=r.created_at,
            finished_at=r.finished_at,
        )
