from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, TypeAdapter, ValidationError, WithJsonSchema

from app.checkpoints.repository import CheckpointName
from app.models import MAX_STEP

CHECKPOINT_NAMES: tuple[str, ...] = get_args(CheckpointName)


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    size_bytes: int
    sha256: str
    created_at: datetime


def checkpoint_ref(*, strict: bool) -> Any:
    """The type of a named checkpoint: a step, `latest` (the newest) or `best` (the lowest FID),
    with one error naming the field otherwise, where a plain union would give one per alternative.
    `strict`: a JSON body's integer only (the models are strict); else a path's text (10.0 is 10)."""
    step = TypeAdapter(Annotated[int, Field(ge=0, le=MAX_STEP, strict=strict)])

    def validate(value: object) -> object:
        if value is None or value in CHECKPOINT_NAMES:
            return value
        try:
            return step.validate_python(value)
        except ValidationError:
            raise ValueError(
                f"a checkpoint step (0 to {MAX_STEP}), `latest` or `best`, not {str(value)[:40]!r}"
            ) from None

    schema = {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": MAX_STEP},
            {"type": "string", "enum": list(CHECKPOINT_NAMES)},
        ]
    }
    return Annotated[int | CheckpointName, PlainValidator(validate), WithJsonSchema(schema)]
