"""Chaos drills: real worker processes killed, frozen and starved of Redis and PostgreSQL.

The servers are restarted with the commands this machine's environment documents and are left
running. Every drill records what it injected in a report (test-artifacts/chaos-report.json).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import ARTIFACTS, PG_ADMIN_URL, REDIS_URL, MakeUser

REPORT: dict[str, list[dict]] = {}


def record(drill: str, **facts: object) -> None:
    REPORT.setdefault(drill, []).append(facts)


@pytest.fixture(scope="session", autouse=True)
def _write_report() -> Iterator[None]:
    yield
    if REPORT:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "chaos-report.json").write_text(json.dumps(REPORT, indent=2))
        print("\nchaos report:", json.dumps(REPORT, indent=1))


@pytest.fixture
def chaos_env(settings_env: dict[str, str]) -> dict[str, str]:
    """Short leases so that recovery happens in seconds, not minutes."""
    return settings_env | {
        "DDPM_LEASE_TIMEOUT_S": "4",
        "DDPM_HEARTBEAT_INTERVAL_S": "0.5",
        "DDPM_RESEND_AFTER_S": "2",
        # One intra-op thread: two workers (or a worker and the test) never spin against each
        # other on a 2-core machine, and every attempt computes with the same thread count.
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture
def api(clean_db: Settings, make_user: MakeUser) -> Iterator[TestClient]:
    with TestClient(create_app(clean_db), headers=make_user("chaos").headers) as client:
        yield client


def start_redis() -> None:
    subprocess.run(
        [
            "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
            "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
        ],
        check=True,
    )  # fmt: skip
    _wait(_redis_up, 30, "redis to start")


def postgres(action: str) -> None:
    """pg_ctlcluster start|stop|restart, as this machine's environment documents it."""
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True)
    if action != "stop":
        _wait(_postgres_up, 60, "postgres to start")


def restart_postgres() -> float:
    start = time.monotonic()
    postgres("restart")
    return time.monotonic() - start


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _postgres_up() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _wait(ready, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def get_job(client: TestClient | httpx.Client, job_id: str) -> dict:
    """Reads through the API, retrying while the database restarts (503)."""
    for _ in range(100):
        r = client.get(f"/v1/jobs/{job_id}")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.2)
    raise AssertionError(f"GET job {job_id}: {r.status_code} {r.text}")


def wait_until(client, job_id: str, predicate, timeout: float, logs: list[Path]) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    job = {}
    while time.monotonic() < deadline:
        job = get_job(client, job_id)
        if predicate(job):
            return job
        time.sleep(0.05)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"job {job_id} stuck at {job}:\n{tails}")


def assert_history_is_whole(client: TestClient, job_id: str, settings: Settings, total: int, every: int) -> None:
    """Metric steps unique and contiguous; every checkpoint row's file matches its sha256."""
    points = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
    assert [p["step"] for p in points] == list(range(every, total + 1, every))
    for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json():
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/{c['step']}")
        assert r.status_code == 200, r.text
        assert hashlib.sha256(r.content).hexdigest() == c["sha256"]
