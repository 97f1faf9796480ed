"""The rules for webhooks: a user's endpoints (at most DDPM_MAX_WEBHOOKS_PER_USER, a URL that
is not on the service's own network, a secret shown once), and the recording of job events.

Recording: `record_event` is called in the transaction that commits the event's own row (the
claim, a checkpoint, sample or evaluation row, a final status) and inserts one delivery per
endpoint of the job's owner that asked for the event, so a delivery exists exactly when its
event happened. Its `event_key` names the event (`job.checkpoint:<job>:<step>`, and per run
`job.started:<job>:<run>`, `job.<status>:<job>:<run>`, where a run is the job's life from a
submit or a continue to its end); a resumed attempt that re-does an event inserts nothing
(ON CONFLICT DO NOTHING), so each event is delivered once per endpoint. Sending is the
worker's delivery thread (worker/webhooks.py), never the API or the training thread.
Services never commit.
"""

from __future__ import annotations

import base64
import secrets
import uuid
from typing import Any

from sqlalchemy.orm import Session

from app.auth.repository import UserRepository
from app.config import Settings
from app.jobs.limits import SpecRefused
from app.models import Job, JobStatus, User, Webhook, utcnow
from app.net import private_host
from app.webhooks.repository import WebhookRepository
from app.webhooks.schemas import DeliveryOut, WebhookIn

SECRET_PREFIX = "whsec_"


class WebhookNotFound(LookupError):
    def __init__(self, webhook_id: uuid.UUID) -> None:
        super().__init__(f"webhook {webhook_id} not found")


class TooManyWebhooks(Exception):
    """The user already has DDPM_MAX_WEBHOOKS_PER_USER endpoints (429)."""


def _scope(user: User) -> uuid.UUID | None:
    """As for jobs: a user sees their own endpoints, an admin every user's."""
    return None if user.is_admin else user.id


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ and the base64 of 32 random bytes (the HMAC key)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def create_webhook(session: Session, body: WebhookIn, owner: User, settings: Settings) -> Webhook:
    """A new endpoint of `owner`'s (its secret in `.secret`, for the one answer that shows it).
    SpecRefused (422 on url) for a loopback/private/link-local host, TooManyWebhooks (429)."""
    url = body.url
    if not settings.webhook_allow_private and private_host(url.host or ""):
        refused = SpecRefused()
        refused.add(
            ("url",),
            f"host {url.host!r} is a loopback, private, link-local or reserved address: refused "
            "(DDPM_WEBHOOK_ALLOW_PRIVATE allows it)",
            str(url),
        )
        raise refused
    repo = WebhookRepository(session)
    UserRepository(session).lock(owner.id)  # the count and the insert agree
    if repo.count(owner.id) >= settings.max_webhooks_per_user:
        raise TooManyWebhooks(
            f"you have {settings.max_webhooks_per_user} webhooks, the most this service allows per user "
            f"(DDPM_MAX_WEBHOOKS_PER_USER); delete one first"
        )
    return repo.add(Webhook(owner_id=owner.id, url=str(url), events=list(body.events), secret=new_secret()))


def get_webhook(session: Session, webhook_id: uuid.UUID, user: User) -> Webhook:
    webhook = WebhookRepository(session).get(webhook_id, owner_id=_scope(user))
    if webhook is None:
        raise WebhookNotFound(webhook_id)
    return webhook


def list_webhooks(session: Session, user: User, *, limit: int, cursor: str | None) -> tuple[list[Webhook], str | None]:
    """Newest first. InvalidCursor for a cursor this API did not write."""
    return WebhookRepository(session).list_page(owner_id=_scope(user), limit=limit, cursor=cursor)


def delete_webhook(session: Session, webhook_id: uuid.UUID, user: User) -> None:
    """The endpoint and its deliveries go; a delivery being sent now is not recorded."""
    WebhookRepository(session).delete(get_webhook(session, webhook_id, user))


def list_deliveries(
    session: Session, webhook_id: uuid.UUID, user: User, *, limit: int, cursor: str | None
) -> tuple[list[DeliveryOut], str | None]:
    """The endpoint's deliveries, newest first, each with its tries."""
    get_webhook(session, webhook_id, user)
    repo = WebhookRepository(session)
    deliveries, next_cursor = repo.deliveries_page(webhook_id, limit=limit, cursor=cursor)
    attempts = repo.attempts_of([d.id for d in deliveries])
    return [DeliveryOut.of(d, attempts[d.id]) for d in deliveries], next_cursor


# --- recording events (in the event's own transaction) -------------------------------------
def event_key(event: str, job_id: uuid.UUID, part: int) -> str:
    """The event's identity: a step (checkpoint, sample, evaluation) or a run (started, final)."""
    return f"{event}:{job_id}:{part}"


def record_event(session: Session, job: Job, event: str, key: str, data: dict[str, Any]) -> int:
    """One pending delivery per endpoint of the job's owner that asked for `event`, unless that
    endpoint already has `key`; returns how many endpoints asked. The payload is the Standard
    Webhooks shape: {type, timestamp, data: {job_id, name, status, step, total_steps, ...}}."""
    webhooks = [w for w in WebhookRepository(session).of_owner(job.owner_id) if event in w.events]
    if not webhooks:
        return 0
    now = utcnow()
    body = {
        "job_id": str(job.id),
        "name": job.name,
        "status": str(JobStatus(job.status).value),
        "step": job.step,
        "total_steps": job.total_steps,
        **data,
    }
    payload = {"type": event, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": body}
    repo = WebhookRepository(session)
    for webhook in webhooks:
        repo.insert_delivery(
            {
                "id": uuid.uuid4(),
                "webhook_id": webhook.id,
                "event": event,
                "event_key": key,
                "job_id": job.id,
                "payload": payload,
                "status": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
        )
    return len(webhooks)


def record_job_started(session: Session, job: Job, attempt: int, resume_step: int) -> None:
    """The claim of a run's first attempt (a resumed attempt of the same run records nothing new)."""
    data = {"step": resume_step, "attempt": attempt}
    record_event(session, job, "job.started", event_key("job.started", job.id, job.runs_finished), data)


def record_job_end(session: Session, job: Job) -> None:
    """The job has just reached its final status in this transaction: the run is counted as
    ended (a continue starts the next one) and its job.<status> event recorded."""
    run = job.runs_finished
    job.runs_finished = run + 1
    status = JobStatus(job.status)
    data = {"loss": job.loss, "error": job.error, "attempt": job.attempt}
    record_event(session, job, f"job.{status.value}", event_key(f"job.{status.value}", job.id, run), data)


def record_step_event(session: Session, job_id: uuid.UUID, event: str, step: int, data: dict[str, Any]) -> None:
    """job.checkpoint / job.sample / job.evaluation of `step`, from the worker's sink."""
    job = session.get(Job, job_id)
    if job is not None:
        record_event(session, job, event, event_key(event, job_id, step), {"step": step, **data})
