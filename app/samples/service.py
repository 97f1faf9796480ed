"""The rules for on-demand sample requests: a request is stored queued and sent to the workers
once the session commits. Made while the broker is away, it stays queued (its `dispatched_at`
null) and the worker's sweeper sends it later, as it does jobs. Services never commit."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.models import SampleRequest
from app.queue import Sender, Task, send_after_commit
from app.samples.repository import SampleRepository


def queue_request(session: Session, dispatcher: Sender, request: SampleRequest) -> SampleRequest:
    """Store `request` (queued) and send it once the session commits."""
    SampleRepository(session).add_request(request)
    send_after_commit(session, dispatcher, Task.sample(request.id))
    return request
