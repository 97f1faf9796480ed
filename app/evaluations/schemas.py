from __future__ import annotations

import math
from datetime import datetime

from pydantic import BaseModel, ConfigDict, field_validator


class EvaluationOut(BaseModel):
    """One evaluation: FID and KID of `samples` images drawn from the EMA weights at `step`,
    against the features of `reference_images` training images."""

    model_config = ConfigDict(from_attributes=True)

    step: int
    fid: float | None  # null: not finite (the drawn images were; JSON has no NaN)
    kid: float | None  # unbiased MMD^2, cubic kernel, mean over subsets (null: not finite)
    kid_std: float | None  # its standard deviation over the subsets
    samples: int
    reference_images: int
    feature_network: str  # "inception-v3", "digits-classifier": FIDs compare only within one
    seconds: float
    created_at: datetime

    @field_validator("fid", "kid", "kid_std", mode="after")
    @classmethod
    def _finite_or_none(cls, value: float | None) -> float | None:
        return value if value is not None and math.isfinite(value) else None
