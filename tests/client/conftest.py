"""One real API process for the client and CLI tests, and one small job trained by a real
worker (stopped once the job is done, so the jobs the tests queue later stay queued)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from app.auth.keys import generate_key
from app.auth.service import create_key
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from tests.conftest import service_env
from tests.e2e.conftest import api_argv, free_port, process, wait_ready, worker_argv

# 30 steps of the tiny U-Net on 8x8 digits: three metric points and three checkpoints.
TINY_JOB = {
    "name": "client tests",
    "dataset": {"image_size": 8},
    "training": {"steps": 30, "batch_size": 16, "log_every": 10, "checkpoint_every": 10},
}


@dataclass(frozen=True)
class RunningApi:
    base: str
    env: dict[str, str]
    logs: Path


@dataclass(frozen=True)
class TrainedJob:
    key: str
    job: dict


@pytest.fixture(scope="package")
def api(service_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApi]:
    logs = tmp_path_factory.mktemp("client-logs")
    port = free_port()
    # Jobs left queued by earlier tests would be trained first by this package's worker (its
    # sweeper re-sends queued jobs): start from no jobs, on a queue of this package's own.
    engine = make_engine(service_settings)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs CASCADE"))
    engine.dispose()
    env = service_env(service_settings) | {
        "DDPM_PORT": str(port),
        "DDPM_BOOTSTRAP_API_KEY": generate_key().key,
        "DDPM_QUEUE": f"ddpm-client-{uuid.uuid4().hex[:8]}",
    }
    with process(api_argv(), env, logs / "api.log") as proc:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, logs / "api.log")
        yield RunningApi(base=base, env=env, logs=logs)


@pytest.fixture(scope="package")
def new_key(service_settings: Settings) -> Iterator[Callable[[], str]]:
    """`new_key()`: the key of a fresh user, so each test sees only its own jobs."""
    engine = make_engine(service_settings)
    factory = make_sessionmaker(engine)

    def make() -> str:
        with session_scope(factory) as session:
            return create_key(session, service_settings.secret_key, f"client-{uuid.uuid4().hex[:8]}").key

    yield make
    engine.dispose()


@pytest.fixture(scope="package")
def trained(api: RunningApi, new_key: Callable[[], str]) -> TrainedJob:
    key = new_key()
    headers = {"Authorization": f"Bearer {key}"}
    with (
        process(worker_argv(), api.env, api.logs / "worker.log"),
        httpx.Client(base_url=api.base, headers=headers, timeout=30) as http,
    ):
        job = http.post("/v1/jobs", json=TINY_JOB).json()
        deadline = time.monotonic() + 300
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.5)
            job = http.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", (job, (api.logs / "worker.log").read_text()[-3000:])
    return TrainedJob(key=key, job=job)
