"""GET /v1/jobs/{id}/events: the job's live progress as Server-Sent Events."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from app.auth.keys import key_prefix
from app.db import session_scope
from app.deps import CurrentUser, bearer_scheme
from app.events.hub import EventHub, EventKey, InvalidEventId
from app.jobs import service
from app.monitoring.process import watched
from app.openapi import AUTHENTICATED, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["events"], responses=AUTHENTICATED)

# STEP.ORDER, as the stream's `id:` lines write it (order 0 metric, 1 checkpoint, 2 sample,
# 3 evaluation), or STEP.4.ID for a training event (ID: its id in GET .../training-events).
# Nine digits hold every step a job can reach (training.steps <= 10,000,000), and nothing
# this pattern admits overflows the database's integer (EventKey.parse checks that too).
EVENT_ID_PATTERN = r"^[0-9]{1,9}\.([0-3]|4\.[0-9]{1,18})$"
EVENT_KINDS = ["metric", "checkpoint", "sample", "evaluation", "training_event", "status"]


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": (
                "text/event-stream. `metric` (id `STEP.0`), `checkpoint` (`STEP.1`), `sample` (`STEP.2`) and "
                "`evaluation` (`STEP.3`) events, `training_event` (`STEP.4.ID`: an item of GET "
                "/v1/jobs/{id}/training-events without created_at) events, and `status` events (the whole "
                "job as GET shows it, no id) first and on every change; the last event is the terminal status "
                "(sent again after a finished job's history), then the stream ends. Reconnect with "
                "Last-Event-ID to continue without gaps."
            ),
            # One schema per event, as SSE tooling (and schemathesis) reads a text/event-stream.
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "event": {"type": "string", "enum": EVENT_KINDS},
                            "id": {"type": "string", "pattern": EVENT_ID_PATTERN},
                            "data": {"type": "string", "contentMediaType": "application/json"},
                        },
                        "required": ["event", "data"],
                    }
                }
            },
        },
        **error_responses(404, 422),
    },
)
def job_events(
    job_id: uuid.UUID,
    user: CurrentUser,
    request: Request,
    # The key current_user accepted: the stream ends within seconds of its revocation.
    credentials: Annotated[HTTPAuthorizationCredentials, Depends(bearer_scheme)],
    # Typed `str` (not `str | None`) so the document says "a string of this pattern, optional"
    # rather than "a string or null": a header has no null.
    last_event_id: Annotated[str, Header(pattern=EVENT_ID_PATTERN)] = None,  # type: ignore[assignment]  # noqa: RUF013
    after: Annotated[
        str,  # noqa: RUF013
        Query(pattern=EVENT_ID_PATTERN, description="Same as Last-Event-ID, for clients without headers"),
    ] = None,  # type: ignore[assignment]
) -> StreamingResponse:
    # A short session of its own, not SessionDep: a request-scoped session would hold a pooled
    # connection for as long as the stream stays open (hundreds of watchers, hours each).
    with session_scope(request.app.state.sessionmaker) as session:
        service.get_job(session, job_id, user)  # 404 for an unknown job or another user's
    raw = last_event_id or after
    try:
        start = EventKey.parse(raw) if raw else None
    except InvalidEventId as exc:
        loc = ["header", "last-event-id"] if last_event_id else ["query", "after"]
        raise HTTPException(422, detail=[{"loc": loc, "msg": str(exc), "type": "value_error"}]) from exc
    hub: EventHub = request.app.state.event_hub
    return StreamingResponse(
        watched(hub.stream(job_id, start, key_prefix=key_prefix(credentials.credentials))),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
