"""GET /metrics against the real PostgreSQL: who may read it, what the database says at scrape
(statuses, GPUs, throughput, queue waits, checkpoint writes, webhook failures), and the request
durations by route template. Several API processes: tests/e2e/test_metrics_processes.py."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import update

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import (
    Checkpoint,
    Job,
    JobAttempt,
    MetricPoint,
    Webhook,
    WebhookAttempt,
    WebhookDelivery,
    utcnow,
)
from tests.conftest import ApiUser, MakeUser

TOKEN = "scrape-" + uuid.uuid4().hex


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, frozenset(labels.items()))]


@pytest.fixture
def admin(make_user: MakeUser) -> ApiUser:
    return make_user("root", admin=True)


@pytest.fixture
def client(clean_db: Settings, admin: ApiUser):
    settings = clean_db.model_copy(update={"metrics_token": SecretStr(TOKEN)})
    with TestClient(create_app(settings), headers=admin.headers) as c:
        yield c


class TestAccess:
    def test_an_admin_key_or_the_token_reads_it(self, client: TestClient, alice: ApiUser) -> None:
        assert client.get("/metrics").status_code == 200
        assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        r = client.get("/metrics", headers=alice.headers)
        assert r.status_code == 403 and "DDPM_METRICS_TOKEN" in r.json()["detail"]
        for headers in ({"Authorization": ""}, {"Authorization": f"Bearer {TOKEN}x"}):
            assert client.get("/metrics", headers=headers).status_code == 401, headers

    def test_no_token_set_opens_nothing(self, clean_db: Settings, alice: ApiUser) -> None:
        with TestClient(create_app(clean_db)) as c:
            assert c.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 401
            assert c.get("/metrics", headers=alice.headers).status_code == 403

    def test_it_is_not_in_the_openapi_document(self, client: TestClient) -> None:
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def submit(client: TestClient, user: ApiUser, **spec: object) -> uuid.UUID:
    r = client.post("/v1/jobs", json=spec, headers=user.headers)
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["id"])


class TestFromTheDatabase:
    def test_statuses_gpus_throughput_waits_writes_and_webhook_failures(
        self, client: TestClient, clean_db: Settings, alice: ApiUser
    ) -> None:
        ids = [submit(client, alice) for _ in range(6)]
        running, running_too, finished, deleted, continued = ids[:5]
        now = utcnow()
        factory = make_sessionmaker(make_engine(clean_db))
        with session_scope(factory) as s:
            s.execute(update(Job).where(Job.id.in_([running, running_too])).values(status="running", attempt=1))
            s.execute(update(Job).where(Job.id.in_([finished, deleted])).values(status="succeeded"))
            s.execute(update(Job).where(Job.id == deleted).values(deleted_at=now))
            s.execute(update(Job).where(Job.id == continued).values(status="running", attempt=2))
            s.execute(update(Job).values(created_at=now - timedelta(minutes=10)))
            # Throughput: the latest point of each running job.
            s.add_all(
                MetricPoint(job_id=running, step=step, loss=0.1, lr=1e-4, images_per_s=rate, mfu=rate / 100)
                for step, rate in ((10, 5.0), (20, 7.5))
            )
            # Queue waits, from when each attempt's job entered the queue: 30, 480, 45 (after a
            # requeue), 100 (a continue) s; none for an attempt whose queue time is unknown (recorded
            # before it was), a deleted job's, or one started before the window.
            start = now - timedelta(minutes=10)
            attempts = [
                (running, 1, start, start + timedelta(seconds=30), None, None),
                (finished, 1, start, now - timedelta(seconds=120), now - timedelta(seconds=75), "requeued"),
                (finished, 2, now - timedelta(seconds=75), now - timedelta(seconds=30), now, "succeeded"),
                (continued, 1, None, now - timedelta(seconds=500), now - timedelta(seconds=400), "succeeded"),
                (continued, 2, now - timedelta(seconds=200), now - timedelta(seconds=100), None, None),
                (deleted, 1, start, start + timedelta(seconds=1), now, "succeeded"),
                (running_too, 1, start, now - timedelta(hours=2), None, None),
            ]
            s.add_all(
                JobAttempt(
                    job_id=job_id, owner_id=alice.user.id, attempt=n, worker="w", device="cpu", gpus=1,
                    queued_at=queued, started_at=started, seen_at=ended or now, ended_at=ended, outcome=outcome,
                )
                for job_id, n, queued, started, ended, outcome in attempts
            )  # fmt: skip
            # Checkpoint writes: two in the window, one without a figure, one of a deleted job, one old.
            for job_id, step, seconds, age in (
                (running, 10, 0.3, 60),
                (running, 20, 4.0, 30),
                (running, 30, None, 10),
                (deleted, 10, 0.01, 60),
                (finished, 10, 0.01, 7200),
            ):
                s.add(
                    Checkpoint(
                        job_id=job_id, step=step, path=f"{job_id}/{step}", size_bytes=1, sha256="0" * 64,
                        state_path=f"{job_id}/{step}.state", write_seconds=seconds,
                        created_at=now - timedelta(seconds=age),
                    )
                )  # fmt: skip
            hook = Webhook(owner_id=alice.user.id, url="https://example.com/h", events=["job.started"], secret="s")
            s.add(hook)
            s.flush()
            delivery = WebhookDelivery(
                webhook_id=hook.id, event="job.started", event_key="k", job_id=running, payload={}
            )
            s.add(delivery)
            s.flush()
            for number, code in enumerate((None, 500, 302, 200), start=1):
                s.add(WebhookAttempt(delivery_id=delivery.id, number=number, status_code=code, seconds=0.1))

        scraped = samples(client.get("/metrics").text)

        statuses = {"queued": 1, "running": 3, "succeeded": 1, "failed": 0, "cancelled": 0}
        for status, count in statuses.items():
            assert value(scraped, "ddpm_jobs", status=status) == count, status
        assert value(scraped, "ddpm_running_gpus") == 3
        rates = {
            dict(labels)["job_id"]: v for (name, labels), v in scraped.items() if name == "ddpm_job_images_per_second"
        }
        assert rates == {str(running): 7.5}  # the others have no point yet
        mfu = {dict(labels)["job_id"]: v for (name, labels), v in scraped.items() if name == "ddpm_job_mfu"}
        assert mfu == {str(running): 0.075}

        assert value(scraped, "ddpm_queue_wait_seconds_gcount") == 4
        assert value(scraped, "ddpm_queue_wait_seconds_gsum") == pytest.approx(30 + 480 + 45 + 100, abs=0.01)
        cumulative = {"15.0": 0, "30.0": 1, "60.0": 2, "300.0": 3, "900.0": 4, "+Inf": 4}
        for le, count in cumulative.items():
            assert value(scraped, "ddpm_queue_wait_seconds_bucket", le=le) == count, le

        assert value(scraped, "ddpm_checkpoint_write_seconds_gcount") == 2
        assert value(scraped, "ddpm_checkpoint_write_seconds_gsum") == pytest.approx(4.3)
        assert value(scraped, "ddpm_checkpoint_write_seconds_bucket", le="0.5") == 1
        assert value(scraped, "ddpm_checkpoint_write_seconds_bucket", le="5.0") == 2

        assert value(scraped, "ddpm_webhook_delivery_failures_total") == 3


class TestFromTheProcess:
    def test_request_durations_are_labelled_by_route_template(self, client: TestClient, alice: ApiUser) -> None:
        job_id = submit(client, alice)
        before = samples(client.get("/metrics").text)
        for _ in range(3):
            assert client.get(f"/v1/jobs/{job_id}", headers=alice.headers).status_code == 200
        assert client.get(f"/v1/jobs/{uuid.uuid4()}", headers=alice.headers).status_code == 404
        assert client.get("/no/such/path").status_code == 404
        text = client.get("/metrics").text
        after = samples(text)

        def count(route: str, status: str) -> float:
            key = (
                "ddpm_http_request_duration_seconds_count",
                frozenset({"method": "GET", "route": route, "status": status}.items()),
            )
            return after.get(key, 0) - before.get(key, 0)

        assert count("/v1/jobs/{job_id}", "200") == 3
        assert count("/v1/jobs/{job_id}", "404") == 1
        assert count("<unmatched>", "404") == 1
        assert str(job_id) not in text and "/no/such/path" not in text


class TestServeMetricsFolder:
    def test_serve_starts_with_an_empty_folder_of_its_own(self, tmp_path, monkeypatch) -> None:
        from app.cli import MULTIPROC_VARIABLE, fresh_metrics_folder

        monkeypatch.setenv(MULTIPROC_VARIABLE, "restored-after-the-test")  # so the value set below goes
        monkeypatch.delenv(MULTIPROC_VARIABLE)
        stale = tmp_path / "prometheus" / "histogram_123.db"
        stale.parent.mkdir()
        stale.write_bytes(b"an earlier run's process")
        fresh_metrics_folder(Settings(data_dir=tmp_path))
        folder = tmp_path / "prometheus"
        assert os.environ[MULTIPROC_VARIABLE] == str(folder.resolve()) and list(folder.iterdir()) == []

    def test_a_folder_given_is_used_and_left_as_it_is(self, tmp_path, monkeypatch) -> None:
        from app.cli import MULTIPROC_VARIABLE, fresh_metrics_folder

        given = tmp_path / "given"
        monkeypatch.setenv(MULTIPROC_VARIABLE, str(given))
        fresh_metrics_folder(Settings(data_dir=tmp_path))
        assert given.is_dir() and not (tmp_path / "prometheus").exists()
