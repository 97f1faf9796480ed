"""/v1/webhooks: endpoints (URL rules, the secret shown once, the per-user limit), and the events
recorded in the event's own transaction (one delivery per endpoint and event key)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.jobs import service as jobs
from app.jobs.repository import JobRepository
from app.main import create_app
from app.models import WEBHOOK_EVENTS, Job, WebhookDelivery, utcnow
from app.webhooks.service import event_key, record_event
from tests.conftest import ApiUser, MakeUser

PUBLIC_URL = "https://hooks.example.com/ddpm"


def deliveries(settings: Settings) -> list[WebhookDelivery]:
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))


class TestEndpoints:
    def test_create_shows_the_secret_once_then_list_get_delete(self, client: TestClient) -> None:
        r = client.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": ["job.succeeded", "job.started"]})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["secret"].startswith("whsec_") and len(created["secret"]) == 50
        assert (created["url"], created["events"]) == (PUBLIC_URL, ["job.started", "job.succeeded"])
        shown = client.get(f"/v1/webhooks/{created['id']}").json()
        assert shown == {k: v for k, v in created.items() if k != "secret"}
        assert client.get("/v1/webhooks").json() == {"items": [shown], "next_cursor": None}
        assert created["secret"] not in client.get("/v1/webhooks").text
        assert client.delete(f"/v1/webhooks/{created['id']}").status_code == 204
        assert client.get(f"/v1/webhooks/{created['id']}").status_code == 404
        assert client.delete(f"/v1/webhooks/{created['id']}").status_code == 404

    def test_events_default_to_all_and_unknown_ones_are_refused(self, client: TestClient) -> None:
        assert client.post("/v1/webhooks", json={"url": PUBLIC_URL}).json()["events"] == list(WEBHOOK_EVENTS)
        r = client.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": ["job.started", "job.exploded"]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "events", 1]
        r = client.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": []})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "events"]

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://hooks.example.com/x",
            "https://user:pw@hooks.example.com/x",
            "https://hooks.example.com/" + "a" * 2048,
            "not a url",
            "http://127.0.0.1:8080/hook",
            "http://127.1/hook",  # IPv4's short form of loopback
            "http://localhost/hook",
            "http://[::1]/hook",
            "http://10.1.2.3/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://[::ffff:192.168.0.1]/hook",
        ],
    )
    def test_a_bad_or_private_url_is_refused_naming_it(self, client: TestClient, url: str) -> None:
        r = client.post("/v1/webhooks", json={"url": url})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "url"]

    def test_private_targets_are_allowed_with_the_setting(self, clean_db: Settings, alice: ApiUser) -> None:
        settings = clean_db.model_copy(update={"webhook_allow_private": True})
        with TestClient(create_app(settings), headers=alice.headers) as c:
            assert c.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"}).status_code == 201

    def test_the_per_user_limit(self, clean_db: Settings, make_user: MakeUser) -> None:
        settings = clean_db.model_copy(update={"max_webhooks_per_user": 2})
        alice, bob = make_user("alice"), make_user("bob")
        with TestClient(create_app(settings), headers=alice.headers) as c:
            for _ in range(2):
                assert c.post("/v1/webhooks", json={"url": PUBLIC_URL}).status_code == 201
            r = c.post("/v1/webhooks", json={"url": PUBLIC_URL})
            assert r.status_code == 429 and "DDPM_MAX_WEBHOOKS_PER_USER" in r.json()["detail"]
            assert c.post("/v1/webhooks", json={"url": PUBLIC_URL}, headers=bob.headers).status_code == 201

    def test_a_bad_cursor_is_a_422_naming_it(self, client: TestClient) -> None:
        r = client.get("/v1/webhooks", params={"cursor": "nope"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "cursor"]


class TestRecording:
    def test_one_delivery_per_matching_endpoint_and_key(self, clean_db: Settings, make_user: MakeUser) -> None:
        alice, bob = make_user("alice"), make_user("bob")
        with TestClient(create_app(clean_db), headers=alice.headers) as c:
            every = c.post("/v1/webhooks", json={"url": PUBLIC_URL}).json()["id"]
            c.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": ["job.cancelled"]})  # not this event
            c.post("/v1/webhooks", json={"url": PUBLIC_URL}, headers=bob.headers)
            job_id = c.post("/v1/jobs", json={"name": "hooked"}).json()["id"]
        factory = make_sessionmaker(make_engine(clean_db))
        for _ in range(2):  # the same checkpoint re-done by a resumed attempt: one delivery
            with session_scope(factory) as s:
                job = s.get(Job, uuid.UUID(job_id))
                assert job is not None
                key = event_key("job.checkpoint", job.id, 50)
                assert record_event(s, job, "job.checkpoint", key, {"step": 50, "sha256": "ab" * 32}) == 1
        [delivery] = deliveries(clean_db)
        assert (str(delivery.webhook_id), delivery.event, delivery.status) == (every, "job.checkpoint", "pending")
        assert delivery.payload["type"] == "job.checkpoint"
        data = delivery.payload["data"]
        assert data == {
            "job_id": job_id,
            "name": "hooked",
            "status": "queued",
            "step": 50,
            "total_steps": data["total_steps"],
            "sha256": "ab" * 32,
        }
        assert {str(d.webhook_id) for d in deliveries(clean_db)} == {every}, "bob's endpoint hears nothing of alice's"

    def test_cancelling_a_queued_job_records_its_event_with_the_status(
        self, clean_db: Settings, alice: ApiUser
    ) -> None:
        with TestClient(create_app(clean_db), headers=alice.headers) as c:
            hook = c.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": ["job.cancelled"]}).json()["id"]
            job_id = c.post("/v1/jobs", json={}).json()["id"]
            assert c.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
            assert c.post(f"/v1/jobs/{job_id}/cancel").status_code == 200  # a repeat records nothing more
            page = c.get(f"/v1/webhooks/{hook}/deliveries").json()
        assert page["next_cursor"] is None
        [item] = page["items"]
        assert (item["event"], item["job_id"], item["status"], item["attempts"]) == (
            "job.cancelled",
            job_id,
            "pending",
            [],
        )
        assert item["payload"]["data"]["status"] == "cancelled"
        [row] = deliveries(clean_db)
        assert row.event_key == f"job.cancelled:{job_id}:0"  # the job's first run

    def test_deliveries_are_paged_newest_first(self, clean_db: Settings, alice: ApiUser) -> None:
        with TestClient(create_app(clean_db), headers=alice.headers) as c:
            hook = c.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": ["job.cancelled"]}).json()["id"]
            jobs = [c.post("/v1/jobs", json={}).json()["id"] for _ in range(3)]
            for job_id in jobs:
                c.post(f"/v1/jobs/{job_id}/cancel")
            first = c.get(f"/v1/webhooks/{hook}/deliveries", params={"limit": 2}).json()
            rest = c.get(f"/v1/webhooks/{hook}/deliveries", params={"limit": 2, "cursor": first["next_cursor"]}).json()
        assert [d["job_id"] for d in first["items"] + rest["items"]] == jobs[::-1]
        assert rest["next_cursor"] is None

    def test_a_lost_attempt_that_ends_the_job_records_its_event(self, clean_db: Settings, alice: ApiUser) -> None:
        with TestClient(create_app(clean_db), headers=alice.headers) as c:
            c.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": ["job.failed"]})
            job_id = uuid.UUID(c.post("/v1/jobs", json={}).json()["id"])
        factory = make_sessionmaker(make_engine(clean_db))
        with session_scope(factory) as s:
            assert JobRepository(s).claim(job_id, "w1") == 1
        with session_scope(factory) as s:  # its worker stopped renewing the lease; one attempt allowed
            assert jobs.requeue_expired(s, utcnow() + timedelta(seconds=1), max_attempts=1) == []
        [row] = deliveries(clean_db)
        assert (row.event, row.event_key, row.payload["data"]["status"]) == (
            "job.failed",
            f"job.failed:{job_id}:0",
            "failed",
        )
        assert "gave up after 1 attempts" in row.payload["data"]["error"]
        with session_scope(factory) as s:
            job = s.get(Job, job_id)
            assert job is not None and job.runs_finished == 1  # a continue would start run 1
