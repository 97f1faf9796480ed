"""Webhooks across a worker kill: a real Celery worker killed (-9) mid-training, the job resumed
by another; a local receiver verifies every delivery's signature and gets each event once (a
resumed attempt re-does steps, not their events), from the workers' delivery threads."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import WebhookDelivery
from tests.conftest import MakeUser
from tests.e2e.conftest import process, wait_for_status, worker_argv
from tests.e2e.test_recovery import wait_step
from tests.webhook_receiver import Received, receiving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def all_sent(settings: Settings, timeout: float, log: Path) -> list[WebhookDelivery]:
    factory = make_sessionmaker(make_engine(settings))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(factory) as s:
            rows = list(s.scalars(select(WebhookDelivery)))
        if rows and all(r.status == "succeeded" for r in rows):
            return rows
        time.sleep(0.5)
    pytest.fail(f"deliveries still {Counter(r.status for r in rows)}:\n{log.read_text()[-3000:]}")


def test_each_event_is_delivered_once_across_a_worker_kill(
    clean_db: Settings, settings_env: dict[str, str], tmp_path: Path, make_user: MakeUser
) -> None:
    env = settings_env | {
        "DDPM_LEASE_TIMEOUT_S": "4",
        "DDPM_HEARTBEAT_INTERVAL_S": "0.5",
        "DDPM_RESEND_AFTER_S": "2",
        "DDPM_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    spec = {
        "dataset": {"image_size": 8},
        "training": {"steps": 120, "batch_size": 16, "log_every": 10, "checkpoint_every": 40, "sample_every": 60},
    }
    received = Received()
    settings = clean_db.model_copy(update={"webhook_allow_private": True})
    with receiving(received) as port, TestClient(create_app(settings), headers=make_user().headers) as client:
        hook = client.post("/v1/webhooks", json={"url": f"http://127.0.0.1:{port}/hook"}).json()
        received.secret = hook["secret"]
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        log = tmp_path / "worker-1.log"
        with process(worker_argv(), env, log) as worker:
            # Past checkpoint 40 and sample 60: attempt 2 resumes from 40 and draws sample 60 again.
            wait_step(client, job_id, 70, timeout=300, log=log)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log2 = tmp_path / "worker-2.log"
        with process(worker_argv(), env, log2):
            job = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=300, logs=[log2])
            rows = all_sent(clean_db, timeout=60, log=log2)
        assert (job["status"], job["attempt"]) == ("succeeded", 2), job

    assert received.unverified == []
    by_id = dict(received.verified)  # a try cut short by the kill may arrive twice: the same webhook-id
    assert set(by_id) == {str(r.id) for r in rows}
    events = Counter((p["type"], p["data"]["step"]) for p in by_id.values())
    print("events received:", sorted(events))
    assert set(events.values()) == {1}, events
    assert [step for kind, step in sorted(events) if kind == "job.checkpoint"] == [40, 80, 120]
    assert [step for kind, step in sorted(events) if kind == "job.sample"] == [60, 120]
    assert [kind for kind, _ in events if kind in ("job.started", "job.succeeded")] == ["job.started", "job.succeeded"]
    assert all(p["data"]["job_id"] == job_id for p in by_id.values())
