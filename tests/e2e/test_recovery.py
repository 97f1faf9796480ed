"""A job outlives its worker: SIGTERM checkpoints and re-queues it; kill -9 loses the lease and
another worker resumes it from the latest checkpoint. Real Celery worker processes."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import MakeUser
from tests.e2e.conftest import process, wait_for_status, worker_argv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def spec(steps: int, checkpoint_every: int) -> dict:
    return {
        "dataset": {"image_size": 8},
        "training": {"steps": steps, "batch_size": 16, "log_every": 10, "checkpoint_every": checkpoint_every},
    }


def wait_step(client: TestClient, job_id: str, at_least: int, timeout: float, log: Path) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["step"] >= at_least and job["status"] == "running":
            return job
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not reach step {at_least}:\n{log.read_text()[-3000:]}")


def test_sigterm_checkpoints_requeues_and_another_worker_resumes(
    clean_db: Settings, settings_env: dict[str, str], tmp_path: Path, make_user: MakeUser
) -> None:
    with TestClient(create_app(clean_db), headers=make_user().headers) as client:
        job_id = client.post("/v1/jobs", json=spec(steps=100_000, checkpoint_every=10_000)).json()["id"]
        log = tmp_path / "worker-1.log"
        with process(worker_argv(), settings_env, log) as worker:
            wait_step(client, job_id, 30, timeout=120, log=log)
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)  # well inside compose's 2-minute stop grace period
            assert worker.returncode == 0, log.read_text()[-3000:]
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued"
        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
        assert [c["step"] for c in checkpoints] == [job["step"]], "the stop saved the step it stopped at"

        log2 = tmp_path / "worker-2.log"
        with process(worker_argv(), settings_env, log2):
            resumed = wait_step(client, job_id, job["step"] + 20, timeout=120, log=log2)
            assert resumed["attempt"] == 2  # a new attempt; the stop is not counted against DDPM_MAX_ATTEMPTS
            client.post(f"/v1/jobs/{job_id}/cancel")
            final = wait_for_status(client, job_id, {"cancelled"}, timeout=60, logs=[log2])
        points = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
        assert [p["step"] for p in points] == list(range(10, final["step"] + 1, 10))


def test_kill_9_loses_the_lease_and_the_job_resumes_from_its_checkpoint(
    clean_db: Settings, settings_env: dict[str, str], tmp_path: Path, make_user: MakeUser
) -> None:
    env = settings_env | {"DDPM_LEASE_TIMEOUT_S": "4", "DDPM_HEARTBEAT_INTERVAL_S": "0.5", "DDPM_RESEND_AFTER_S": "2"}
    with TestClient(create_app(clean_db), headers=make_user().headers) as client:
        job_id = client.post("/v1/jobs", json=spec(steps=300, checkpoint_every=50)).json()["id"]
        log = tmp_path / "worker-1.log"
        with process(worker_argv(), env, log) as worker:
            wait_step(client, job_id, 120, timeout=120, log=log)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        killed_at = client.get(f"/v1/jobs/{job_id}").json()
        assert killed_at["status"] == "running"  # nobody has noticed yet

        log2 = tmp_path / "worker-2.log"
        with process(worker_argv(), env, log2):
            job = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=180, logs=[log2])
        assert job["status"] == "succeeded", job
        assert (job["attempt"], job["step"]) == (2, 300)
        points = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
        assert [p["step"] for p in points] == list(range(10, 301, 10))
        for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json():
            body = client.get(f"/v1/jobs/{job_id}/checkpoints/{c['step']}").content
            assert hashlib.sha256(body).hexdigest() == c["sha256"]
