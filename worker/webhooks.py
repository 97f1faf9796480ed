"""Webhook deliveries leave from here: a thread in every worker process (started beside the
sweeper), never the API or the training thread.

Each pass takes up to BATCH due deliveries (pending, next_attempt_at passed, not held by a
live sender: app/webhooks/repository.py), holds them until `locked_until` (commits), then tries
them side by side:
  - the endpoint's host is resolved and every address checked (app/net.py; not with
    DDPM_WEBHOOK_ALLOW_PRIVATE), the POST goes to the checked address (no second lookup for a
    rebinding DNS to answer), redirects are not followed, DDPM_WEBHOOK_TIMEOUT_S per phase;
  - signed the Standard Webhooks way (the `standardwebhooks` package): webhook-id (the delivery
    id, the same on every try), webhook-timestamp (this try's unix seconds), webhook-signature
    `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` keyed by the secret's decoded bytes;
  - the try is recorded (webhook_attempts) with the delivery's new state, only while the hold is
    still this sender's: succeeded on a 2xx; else retried after 5 s doubling per try (at most an
    hour, ±20 % jitter), and failed once DDPM_WEBHOOK_RETRY_FOR_S has passed since the event
    (the last try is at that deadline).
A sender killed mid-try leaves its hold to expire; the delivery is tried again (the receiver
may see a webhook-id twice, which is what it deduplicates on).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks.webhooks import Webhook as Signer

from app import net
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.models import WebhookAttempt, utcnow
from app.webhooks.repository import WebhookRepository

log = logging.getLogger(__name__)

BATCH = 8  # deliveries tried side by side in one pass
POLL_S = 1.0  # the wait after a pass that found nothing due
BACKOFF_BASE_S = 5.0
BACKOFF_CAP_S = 3600.0
HOLD_MARGIN_S = 30.0  # a hold outlasts a try's timeout by this much (the lookup, the recording)
MAX_ERROR_CHARS = 500
USER_AGENT = "ddpm-jobs-webhooks"
_stop = threading.Event()


@dataclass(frozen=True)
class Outcome:
    """One try's result: the receiver's status code, or why there was none."""

    status_code: int | None
    error: str | None
    seconds: float

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def backoff_s(tries: int) -> float:
    """Seconds from try `tries` to the next: 5 s doubling per try, at most an hour, ±20 % jitter
    (so endpoints that failed together are not all retried in the same second)."""
    return min(BACKOFF_BASE_S * 2.0 ** (tries - 1), BACKOFF_CAP_S) * random.uniform(0.8, 1.2)


def signed_headers(secret: str, delivery_id: uuid.UUID, body: str, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one try of `body`, signed at `at`."""
    return {
        "webhook-id": str(delivery_id),
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Signer(secret).sign(str(delivery_id), at, body),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }


def post(url: str, body: str, headers: dict[str, str], settings: Settings) -> Outcome:
    """POST `body` to `url` at a checked address; the answer's body is not read."""
    started = time.monotonic()
    try:
        parsed = httpx.URL(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        host = parsed.raw_host.decode("ascii")
        address = net.checked_address(host, port, settings.webhook_allow_private, "DDPM_WEBHOOK_ALLOW_PRIVATE")
        # No proxies from the environment (they would connect for us, to anything), no redirects.
        with httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
            request = net.pinned_request(client, "POST", parsed, address, headers=headers, content=body.encode())
            response = client.send(request, stream=True)
            response.close()
    except net.AddressRefused as exc:
        return Outcome(None, f"refused: {exc}", time.monotonic() - started)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS], time.monotonic() - started)
    seconds = time.monotonic() - started
    if 200 <= response.status_code < 300:
        return Outcome(response.status_code, None, seconds)
    error = f"answered {response.status_code} {response.reason_phrase}"
    if response.is_redirect:
        error += " (redirects are not followed: register the final URL)"
    return Outcome(response.status_code, error, seconds)


def send_due(factory: sessionmaker[Session], settings: Settings, now: datetime | None = None) -> int:
    """One pass: hold the due deliveries, try them side by side, record each; how many were tried.
    `now` is the pass's clock (the schedule's); signatures carry the real time."""
    now = now or utcnow()
    until = now + timedelta(seconds=settings.webhook_timeout_s + HOLD_MARGIN_S)
    with session_scope(factory) as session:
        repo = WebhookRepository(session)
        held = [d for d in repo.due(now, BATCH) if repo.lock(d, now, until)]
    if held:
        with ThreadPoolExecutor(max_workers=len(held), thread_name_prefix="ddpm-webhook") as pool:
            list(pool.map(lambda delivery_id: try_delivery(factory, settings, delivery_id, until, now), held))
    return len(held)


def try_delivery(
    factory: sessionmaker[Session], settings: Settings, delivery_id: uuid.UUID, until: datetime, now: datetime
) -> None:
    """One try of a held delivery, recorded with the delivery's next state."""
    with session_scope(factory) as session:
        found = WebhookRepository(session).held(delivery_id, until)
        if found is None:  # its endpoint was deleted meanwhile
            return
        delivery, webhook = found
        url, secret, payload = webhook.url, webhook.secret, delivery.payload
        number, deadline = delivery.attempts + 1, delivery.created_at + timedelta(seconds=settings.webhook_retry_for_s)
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    outcome = post(url, body, signed_headers(secret, delivery_id, body, utcnow()), settings)
    if outcome.delivered:
        values: dict[str, object] = {"status": "succeeded", "delivered_at": now}
    elif now >= deadline:
        values = {"status": "failed"}
    else:
        values = {"next_attempt_at": min(now + timedelta(seconds=backoff_s(number)), deadline)}
    attempt = WebhookAttempt(
        delivery_id=delivery_id,
        number=number,
        at=now,
        status_code=outcome.status_code,
        error=outcome.error,
        seconds=outcome.seconds,
    )
    with session_scope(factory) as session:
        recorded = WebhookRepository(session).record_try(attempt, until, **values)
    if not recorded:
        log.warning("webhook delivery %s: try %d not recorded (deleted, or held by another)", delivery_id, number)
    elif not outcome.delivered:
        log.info("webhook delivery %s to %s: try %d failed (%s)", delivery_id, url, number, outcome.error)


def _loop(settings: Settings) -> None:
    factory = make_sessionmaker(make_engine(settings))
    while not _stop.is_set():
        tried = 0
        try:
            tried = send_due(factory, settings)
        except DBAPIError as exc:  # the database is away; the next pass tries again
            log.warning("webhook deliveries skipped, database unavailable (%s)", exc.orig)
        except Exception:
            log.exception("webhook delivery pass failed")
        if not tried:
            _stop.wait(POLL_S)


def start_delivery(settings: Settings) -> None:
    """The delivery thread of this worker process."""
    _stop.clear()
    threading.Thread(target=_loop, args=(settings,), name="ddpm-webhooks", daemon=True).start()


def stop_delivery() -> None:
    """No new passes; a try under way ends (or its hold expires and another worker retries it)."""
    _stop.set()
