"""GET /v1/usage as the API shows it."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field


class UserUsage(BaseModel):
    user_id: uuid.UUID
    user: str = Field(description="The user's name.")
    gpu_seconds: float = Field(
        description="Sum over the user's attempts of resources.gpus x the seconds each ran within the window "
        "(a running attempt up to its latest heartbeat; on a CPU worker a GPU is a training process)."
    )
    attempts: int = Field(description="Attempts that ran at some time in the window.")
    jobs: int = Field(description="Distinct jobs of those attempts (a deleted job's attempts still count above).")


class UsageOut(BaseModel):
    since: datetime
    until: datetime
    items: list[UserUsage] = Field(description="Yourself; for an admin, every user. Most GPU-seconds first.")
