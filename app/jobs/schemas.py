"""Job resources as the API shows them."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.models import MAX_STEP, JobStatus
from app.spec import JobSpec


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str | None
    status: JobStatus
    spec: JobSpec
    step: int
    total_steps: int
    loss: float | None
    error: str | None
    attempt: int
    worker: str | None = Field(None, description="The worker (host:pid) running or last running the job.")
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    queue: str | None = Field(
        None, description="The Celery queue of the workers that can hold this job (its GPUs and memory per GPU)."
    )
    waiting_reason: str | None = Field(
        None,
        description="While queued: why the job has not started (e.g. no running worker can hold it). "
        "GET /v1/jobs/{id}, the job list and the status events of GET /v1/jobs/{id}/events fill it in.",
    )
    gpu_seconds: float = Field(
        0.0,
        description="GPUs x seconds of all the job's attempts (a running one up to its latest heartbeat); "
        "GET /v1/usage sums them per user.",
    )
    eta_seconds: float | None = Field(
        None,
        description="While running: the seconds its remaining steps take at the rate measured at its latest "
        "metric point; null before the first point and when not running.",
    )


class ContinueIn(BaseModel):
    """POST /v1/jobs/{id}/continue: the job's new total of optimizer steps."""

    model_config = ConfigDict(extra="forbid", strict=True)

    steps: int = Field(
        ge=1,
        le=MAX_STEP,
        description="The new training.steps: more than the job has done, at most DDPM_MAX_STEPS. "
        "Training resumes from its latest checkpoint.",
    )


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
