from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class LogLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt: int
    seq: int = Field(description="The line's place in its attempt, from 0.")
    at: datetime = Field(description="When the worker logged it.")
    level: str = Field(description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    logger: str = Field(description="The worker's logger, e.g. `worker.attempt`.")
    message: str = Field(description="The message; a failure's traceback follows it on the next lines.")


class LogPage(BaseModel):
    items: list[LogLineOut]
    # Pass as `cursor` to get the next page; None when this page reached the lines kept so far.
    next_cursor: str | None
