"""A Python client for the ddpm-jobs API (`DdpmClient`) and the `ddpm` command built on it."""

from app.client.api import (
    ApiError,
    ChecksumMismatch,
    DdpmClient,
    DdpmError,
    Event,
    SampleFailed,
    ServerUnreachable,
)

__all__ = ["ApiError", "ChecksumMismatch", "DdpmClient", "DdpmError", "Event", "SampleFailed", "ServerUnreachable"]
