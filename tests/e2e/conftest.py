"""Real processes: the API and a Celery worker started with the same entrypoints as compose."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.cli import WORKER_COMMAND
from bench.common import process as process  # re-exported: the benchmarks' process runner
from worker.ddpm.distributed import free_port as free_port  # re-exported for the other test folders

BIN = Path(sys.executable).parent


def wait_ready(base: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{base} did not come up in {timeout}s:\n{log.read_text()[-4000:]}")


def api_argv() -> list[str]:
    return [str(BIN / "ddpm-jobs"), "api"]


@contextmanager
def running_api(env: dict[str, str], tmp_path: Path, **settings: str) -> Iterator[str]:
    """A real `ddpm-jobs api` process on a free port with `env` plus `settings` (DDPM_* values),
    logging to tmp_path/api.log; yields its base URL once it answers."""
    port = free_port()
    log = tmp_path / "api.log"
    with process(api_argv(), env | {"DDPM_PORT": str(port), **settings}, log) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, log)
        yield base


def worker_argv() -> list[str]:
    return [str(BIN / WORKER_COMMAND[0]), *WORKER_COMMAND[1:]]


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float, logs: list[Path]) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"job {job_id} still {job.get('status')} after {timeout}s:\n{tails}")
