"""`ddpm-jobs serve` as a user runs it, stopped with real signals.

One test, two starts on one data directory: the first is stopped with SIGTERM to `serve` alone
(a supervisor's stop), the second with SIGINT to its whole process group (a terminal's Ctrl-C).
Each time: no worker outlives `serve`, and the running job is `queued` the moment `serve` has
exited, with a checkpoint of the step it stopped at, the stop not counted as a lost attempt. On the way, an
on-demand sample is drawn while the only training worker is busy with that job, and every start
ends its console output with the dashboard link.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.models import Checkpoint, Job
from tests.e2e.conftest import BIN, free_port, process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LONG_JOB = {
    "name": "runs until stopped",
    "dataset": {"kind": "digits", "image_size": 8},
    "training": {"steps": 100_000, "batch_size": 16, "log_every": 10, "checkpoint_every": 30, "keep_checkpoints": 3},
}


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for_ready_message(serve: subprocess.Popen, log: Path, timeout: float = 180) -> list[str]:
    """The console's lines up to `serve`'s ready message (the API listens, both workers have
    checked in). A queued job may be claimed, and logged, right after."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and serve.poll() is None:
        lines = log.read_text().splitlines()
        ends = [i for i, line in enumerate(lines) if line.startswith("  stop: Ctrl-C")]
        if ends:
            return lines[: ends[0] + 1]
        time.sleep(0.2)
    pytest.fail(f"serve never said it was ready:\n{log.read_text()[-4000:]}")


def check_link_is_last(console: list[str], base: str, key: str, workers: list[int]) -> None:
    """The link comes after both workers' start-up logs, and no Celery banner buries it."""
    assert console[-3] == f"  dashboard: {base}/#key={key}"
    assert len(workers) == 2 and all(str(pid) in console[-4] for pid in workers)
    assert sum(line.endswith(" ready.") and "celery@" in line for line in console) == 2
    assert not any("[queues]" in line for line in console)


def wait_for_step(client: httpx.Client, job_id: str, past: int, log: Path, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["step"] > past:
            return job
        time.sleep(0.3)
    pytest.fail(f"job {job_id} did not pass step {past}:\n{log.read_text()[-4000:]}")


def stored(data_dir: Path, job_id: str) -> tuple[Job, list[int]]:
    """The job's row and its checkpoints' steps, read from the embedded database itself."""
    engine = make_engine(Settings(data_dir=data_dir, database_url="", broker_url=""))
    try:
        with session_scope(make_sessionmaker(engine)) as s:
            job = s.get(Job, uuid.UUID(job_id))
            steps = [c.step for c in s.query(Checkpoint).filter_by(job_id=job.id).order_by(Checkpoint.step)]
            s.expunge_all()
            return job, steps
    finally:
        engine.dispose()


def check_stopped(serve, workers: list[int], data_dir: Path, job_id: str, exit_code: int, log: Path) -> Job:
    serve.wait(timeout=150)
    assert serve.returncode == exit_code, log.read_text()[-4000:]
    assert [pid for pid in workers if alive(pid)] == [], "a worker outlived serve"
    assert processes_of(data_dir) == []  # nor anything they started
    # The worker stopped consuming before it re-queued the job: it did not take it back.
    assert log.read_text().count(" claimed by ") == 1, log.read_text()[-4000:]
    job, steps = stored(data_dir, job_id)
    # Queued at once (not `running` until a lease runs out), resumable from the step it stopped
    # at, and the stop did not use up an attempt.
    assert (job.status, job.worker, job.attempt - job.stops) == ("queued", None, 0), log.read_text()[-4000:]
    assert steps[-1] == job.step and job.step % 10 == 0
    return job


def test_serve_stops_its_workers_and_requeues_the_running_job(tmp_path: Path) -> None:
    port, data_dir = free_port(), tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    env |= {"DDPM_DATA_DIR": str(data_dir), "DDPM_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    base, log = f"http://127.0.0.1:{port}", tmp_path / "serve.log"

    with process([str(BIN / "ddpm-jobs"), "serve"], env, log) as serve:
        console = wait_for_ready_message(serve, log)
        key = (data_dir / "api-key").read_text().strip()
        workers = children(serve.pid)
        check_link_is_last(console, base, key, workers)
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            job_id = client.post("/v1/jobs", json=LONG_JOB).json()["id"]
            wait_for_step(client, job_id, 30, log)  # a checkpoint at step 30 is committed
            # The training worker is busy with the job: the samples worker draws this one.
            request = client.post(f"/v1/jobs/{job_id}/sample", json={"count": 4, "steps": 5})
            assert request.status_code == 202, request.text
            url = f"/v1/jobs/{job_id}/sample/{request.json()['id']}"
            deadline = time.monotonic() + 120
            while client.get(url).json()["status"] not in {"succeeded", "failed"} and time.monotonic() < deadline:
                time.sleep(0.3)
            assert client.get(url).json()["status"] == "succeeded", log.read_text()[-4000:]
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        os.kill(serve.pid, signal.SIGTERM)  # serve alone, as a supervisor stops it
        first = check_stopped(serve, workers, data_dir, job_id, 128 + signal.SIGTERM, log)

    log2 = tmp_path / "serve2.log"
    with process([str(BIN / "ddpm-jobs"), "serve"], env, log2) as serve:
        console = wait_for_ready_message(serve, log2)
        workers = children(serve.pid)
        check_link_is_last(console, base, key, workers)  # at every start, not only the first
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            job = wait_for_step(client, job_id, first.step, log2)  # resumed where it stopped
            assert job["attempt"] == 2  # a new attempt: a new fencing token
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        second = check_stopped(serve, workers, data_dir, job_id, 128 + signal.SIGINT, log2)
    assert second.step > first.step


def processes_of(data_dir: Path) -> list[int]:
    """Live processes started with DDPM_DATA_DIR=data_dir (serve and its workers)."""
    marker = f"DDPM_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return [pid for pid in found if alive(pid)]


def test_workers_stop_when_serve_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves serve no chance to stop its workers: the kernel sends them SIGTERM."""
    data_dir = tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    env |= {"DDPM_DATA_DIR": str(data_dir), "DDPM_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    with process([str(BIN / "ddpm-jobs"), "serve"], env, log) as serve:
        wait_for_ready_message(serve, log)
        workers = children(serve.pid)
        assert len(workers) == 2
        serve.kill()
        serve.wait(timeout=10)
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in workers if alive(pid)] == [], log.read_text()[-4000:]


def test_serve_that_cannot_start_its_api_stops_its_workers(tmp_path: Path) -> None:
    """An error in the API (here: its port is taken) ends `serve` with its workers."""
    data_dir = tmp_path / "var"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
        env |= {"DDPM_DATA_DIR": str(data_dir), "DDPM_PORT": str(taken.getsockname()[1])}
        log = tmp_path / "serve.log"
        with process([str(BIN / "ddpm-jobs"), "serve"], env, log) as serve:
            serve.wait(timeout=120)
            assert serve.returncode != 0
            assert "address already in use" in log.read_text().lower()
            assert processes_of(data_dir) == [], log.read_text()[-4000:]
