from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict


class MetricPointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    loss: float | None  # null: every step since the previous point had a non-finite loss
    lr: float
    images_per_s: float
    # The mean unweighted loss per tenth of [0, T) (worker/ddpm/sink.py LOSS_BUCKETS), null where
    # no image's t fell; null for points recorded before it was measured.
    loss_by_t: list[float | None] | None
    # Model FLOP utilisation (0..1): images/s x training FLOPs per image / the GPU's dense bf16 peak;
    # null on the CPU, an unlisted GPU, and for points recorded before it was measured.
    mfu: float | None
    # The most GPU memory the attempt's tensors had held by this step; null on the CPU.
    peak_memory_bytes: int | None
    created_at: datetime


class MetricPage(BaseModel):
    items: list[MetricPointOut]
    # Pass as `after_step` to get the next page; None when this page reached the end.
    next_after_step: int | None
