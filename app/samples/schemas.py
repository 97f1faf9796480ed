from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel

from app.models import Sample


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
