"""GET /v1/usage: GPU-seconds per user over a window of time."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from pydantic import BeforeValidator

from app.deps import CurrentUser, SessionDep
from app.openapi import AUTHENTICATED, error_responses
from app.usage import service
from app.usage.schemas import UsageOut

router = APIRouter(prefix="/v1/usage", tags=["usage"], responses=AUTHENTICATED)


def _iso_8601(value: object) -> object:
    """Only an ISO 8601 date or time: pydantic would also read a bare number as Unix seconds."""
    if isinstance(value, str) and not re.match(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("not an ISO 8601 time or date (e.g. 2026-11-01T00:00:00Z or 2026-11-01)")
    return value


IsoTime = Annotated[datetime, BeforeValidator(_iso_8601)]


@router.get("", response_model=UsageOut, responses=error_responses(422))
def get_usage(
    user: CurrentUser,
    session: SessionDep,
    since: Annotated[
        IsoTime | None, Query(description="ISO 8601; without an offset, UTC. Default: 30 days before `until`.")
    ] = None,
    until: Annotated[IsoTime | None, Query(description="ISO 8601; without an offset, UTC. Default: now.")] = None,
) -> UsageOut:
    """GPU-seconds, attempts and jobs per user in [since, until): yours; an admin sees every user.
    An attempt counts for the part of it inside the window, times its job's resources.gpus."""
    try:
        window = service.usage_window(since, until)
    except service.InvalidWindow as exc:
        detail = [{"loc": ["query", exc.field], "msg": str(exc), "type": "value_error"}]
        raise HTTPException(422, detail=detail) from exc
    return UsageOut(since=window[0], until=window[1], items=service.usage(session, user, *window))
