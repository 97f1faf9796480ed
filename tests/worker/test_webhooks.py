"""The delivery thread's pass (worker/webhooks.py) against a real local receiver: signed the
Standard Webhooks way, retried with backoff while the receiver is down, failed after
DDPM_WEBHOOK_RETRY_FOR_S, never sent to a private address unless allowed, no redirects."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Job, Webhook, WebhookDelivery
from app.webhooks.service import event_key, record_event
from tests.conftest import MakeUser
from tests.webhook_receiver import Received, receiving
from worker.webhooks import BACKOFF_BASE_S, send_due, signed_headers

# The Standard Webhooks specification's own example (standard-webhooks/spec, its test vectors).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_BODY = '{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signing_matches_the_specifications_example() -> None:
    at = datetime.fromtimestamp(1614265330, UTC)
    headers = signed_headers(SPEC_SECRET, SPEC_ID, SPEC_BODY, at)  # type: ignore[arg-type]
    assert (headers["webhook-id"], headers["webhook-timestamp"]) == (SPEC_ID, "1614265330")
    assert headers["webhook-signature"] == SPEC_SIGNATURE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Hooked:
    """Alice's endpoint at `url` and one queued job of hers; `event()` records a checkpoint event."""

    def __init__(self, settings: Settings, make_user: MakeUser, url: str) -> None:
        self.settings = settings
        self.factory = make_sessionmaker(make_engine(settings))
        self.alice = make_user("alice")
        allowed = settings.model_copy(update={"webhook_allow_private": True})
        with TestClient(create_app(allowed), headers=self.alice.headers) as c:
            created = c.post("/v1/webhooks", json={"url": url}).json()
            self.webhook_id, self.secret = created["id"], created["secret"]
            self.job_id = uuid.UUID(c.post("/v1/jobs", json={}).json()["id"])

    def event(self, step: int) -> None:
        with session_scope(self.factory) as s:
            job = s.get(Job, self.job_id)
            assert job is not None
            record_event(s, job, "job.checkpoint", event_key("job.checkpoint", job.id, step), {"step": step})

    def rows(self) -> list[WebhookDelivery]:
        with session_scope(self.factory) as s:
            return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))

    def listed(self) -> list[dict]:
        with TestClient(create_app(self.settings), headers=self.alice.headers) as c:
            return c.get(f"/v1/webhooks/{self.webhook_id}/deliveries").json()["items"]


@pytest.fixture
def allowed(clean_db: Settings) -> Settings:
    return clean_db.model_copy(update={"webhook_allow_private": True, "webhook_timeout_s": 2.0})


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def hooked(allowed: Settings, make_user: MakeUser, port: int) -> Hooked:
    return Hooked(allowed, make_user, f"http://127.0.0.1:{port}/hook")


@pytest.fixture
def received(hooked: Hooked) -> Iterator[Received]:
    yield Received(secret=hooked.secret)


def test_a_delivery_is_signed_and_succeeds(hooked: Hooked, received: Received, port: int) -> None:
    hooked.event(10)
    with receiving(received, port):
        assert send_due(hooked.factory, hooked.settings) == 1
        assert send_due(hooked.factory, hooked.settings) == 0  # nothing more is due
    [row] = hooked.rows()
    assert received.unverified == []
    assert [(i, p["type"], p["data"]["step"]) for i, p in received.verified] == [(str(row.id), "job.checkpoint", 10)]
    assert (row.status, row.attempts, row.locked_until) == ("succeeded", 1, None)
    [listed] = hooked.listed()
    assert [(a["number"], a["status_code"], a["error"]) for a in listed["attempts"]] == [(1, 204, None)]


def test_retries_survive_the_receiver_being_down(hooked: Hooked, received: Received, port: int) -> None:
    hooked.event(10)
    now = datetime.now(UTC)
    assert send_due(hooked.factory, hooked.settings, now) == 1  # nobody listens on the port
    [row] = hooked.rows()
    assert (row.status, row.attempts) == ("pending", 1)
    wait = (row.next_attempt_at - now).total_seconds()
    assert BACKOFF_BASE_S * 0.8 <= wait <= BACKOFF_BASE_S * 1.2
    assert send_due(hooked.factory, hooked.settings, now + timedelta(seconds=1)) == 0, "not due yet"
    second_try = row.next_attempt_at
    assert send_due(hooked.factory, hooked.settings, second_try) == 1  # still down
    [row] = hooked.rows()
    wait = (row.next_attempt_at - second_try).total_seconds()
    assert row.attempts == 2 and 2 * BACKOFF_BASE_S * 0.8 <= wait <= 2 * BACKOFF_BASE_S * 1.2  # doubled
    with receiving(received, port):  # it comes back
        assert send_due(hooked.factory, hooked.settings, row.next_attempt_at) == 1
    [row] = hooked.rows()
    assert (row.status, row.attempts) == ("succeeded", 3)
    assert [i for i, _ in received.verified] == [str(row.id)] and received.unverified == []
    [listed] = hooked.listed()
    tries = listed["attempts"]
    assert [(a["number"], a["status_code"]) for a in tries] == [(1, None), (2, None), (3, 204)]
    assert all("ConnectError" in a["error"] for a in tries[:2])


def test_a_delivery_fails_once_its_retry_window_has_passed(hooked: Hooked, received: Received, port: int) -> None:
    hooked.event(10)
    [row] = hooked.rows()
    received.answer = 500
    with receiving(received, port):
        late = row.created_at + timedelta(seconds=hooked.settings.webhook_retry_for_s - 1)
        assert send_due(hooked.factory, hooked.settings, late) == 1
        [row] = hooked.rows()
        deadline = row.created_at + timedelta(seconds=hooked.settings.webhook_retry_for_s)
        assert (row.status, row.next_attempt_at) == ("pending", deadline), "the last try is at the deadline"
        assert send_due(hooked.factory, hooked.settings, deadline) == 1
    [row] = hooked.rows()
    assert (row.status, row.attempts) == ("failed", 2)
    assert [a["error"] for a in hooked.listed()[0]["attempts"]] == ["answered 500 Internal Server Error"] * 2
    assert send_due(hooked.factory, hooked.settings, deadline + timedelta(days=1)) == 0


def test_redirects_are_not_followed(hooked: Hooked, received: Received, port: int) -> None:
    hooked.event(10)
    received.answer, received.headers = 307, {"Location": "http://169.254.169.254/latest/meta-data"}
    with receiving(received, port):
        send_due(hooked.factory, hooked.settings)
    [listed] = hooked.listed()
    assert listed["status"] == "pending"
    assert listed["attempts"][0]["error"].startswith("answered 307 Temporary Redirect (redirects are not followed")


def test_private_addresses_are_refused_at_delivery(
    hooked: Hooked, received: Received, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that resolves to loopback (as a rebinding DNS would answer after creation)."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host == "rebound.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    strict = hooked.settings.model_copy(update={"webhook_allow_private": False})
    hooked.event(10)
    with session_scope(hooked.factory) as s:  # as if DNS had answered a public address at creation
        webhook = s.get(Webhook, uuid.UUID(hooked.webhook_id))
        assert webhook is not None
        webhook.url = f"http://rebound.test:{port}/hook"
    with receiving(received, port):
        assert send_due(hooked.factory, strict) == 1
    assert received.verified == [] and received.unverified == []
    [listed] = hooked.listed()
    assert listed["attempts"][0]["error"] == (
        "refused: it resolves to a loopback address 127.0.0.1, not a public one (DDPM_WEBHOOK_ALLOW_PRIVATE allows it)"
    )


def test_a_deleted_endpoint_takes_its_deliveries_with_it(hooked: Hooked) -> None:
    hooked.event(10)
    with TestClient(create_app(hooked.settings), headers=hooked.alice.headers) as c:
        assert c.delete(f"/v1/webhooks/{hooked.webhook_id}").status_code == 204
    assert hooked.rows() == []
    assert send_due(hooked.factory, hooked.settings) == 0
