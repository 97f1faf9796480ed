from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    size_bytes: int
    sha256: str
    created_at: datetime
