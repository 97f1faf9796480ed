"""Job resources as the API shows them."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from app.models import JobStatus
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
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
