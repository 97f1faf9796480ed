from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int = Field(description="Orders the job's events; pass the last one seen as `after_id`.")
    attempt: int = Field(description="The attempt it happened in.")
    step: int = Field(description="The step it happened at (the step that was redone, for `oom_halved`).")
    kind: str = Field(
        description=(
            "`oom_halved` (a step ran out of GPU memory and was redone with the micro-batch halved), "
            "`compile_failed` (the job trains eagerly), `graphs_failed` (the job trains without CUDA graphs)."
        )
    )
    message: str = Field(description="One line for people.")
    detail: dict[str, Any] = Field(
        description=(
            'Facts for programs: `oom_halved` {"micro_batch": new, "was": old, "batch": per-GPU batch}; '
            '`compile_failed` and `graphs_failed` {"error": "<type>: <message>"}.'
        )
    )
    created_at: datetime


class JobEventPage(BaseModel):
    items: list[JobEventOut]
    # Pass as `after_id` to get the next page; None when this page reached the end.
    next_after_id: int | None
