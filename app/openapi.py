"""Error responses as the OpenAPI document declares them, shared by every router."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorOut(BaseModel):
    detail: str


class LimitErrorItem(BaseModel):
    type: str
    loc: list[str | int]
    msg: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ValidationErrorOut(BaseModel):
    """FastAPI's shape for 422: the spec's own validation and this service's limits alike."""

    detail: list[LimitErrorItem]


_DESCRIPTIONS = {
    400: "The body is not JSON text (e.g. not UTF-8)",
    401: "Missing, malformed, unknown or revoked API key",
    404: "No such job, or not one of yours",
    409: "Conflicts with the job's state or an earlier request",
    410: "The checkpoint's file is missing or damaged",
    413: "Request body larger than this service accepts",
    422: "Invalid input, or over one of this service's limits (`loc` names the field)",
    429: "Too many queued and running jobs for this user",
    503: "The database is unavailable",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {"model": ValidationErrorOut if code == 422 else ErrorOut, "description": _DESCRIPTIONS[code]}
        for code in codes
    }


# Every authenticated route can answer these.
AUTHENTICATED = error_responses(401, 503)
