"""`ddpm watch` end to end: the installed command follows a real digits job trained by a real
worker, while the API is killed (-9) and restarted under it. It reconnects with Last-Event-ID,
prints every metric point once, and exits 0 when the job succeeds. What it printed is kept in
test-artifacts/ddpm-watch.txt."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from app.auth.keys import generate_key
from app.config import Settings
from tests.client.conftest import service_env
from tests.conftest import ARTIFACTS
from tests.e2e.conftest import BIN, api_argv, free_port, process, wait_ready, worker_argv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DIGITS_JOB = {
    "name": "watch digits",
    "dataset": {"kind": "digits", "image_size": 8},
    "training": {
        "steps": 40,
        "batch_size": 8,
        "learning_rate": 2e-3,
        "warmup_steps": 5,
        "log_every": 5,
        "checkpoint_every": 20,
    },
}
EVENTS_PATH = "/v1/jobs/{job_id}/events"


def wait_for_text(path: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, path.read_text()):
            return
        if proc.poll() is not None:
            pytest.fail(f"ddpm watch exited with {proc.returncode} before {pattern!r}:\n{path.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} from ddpm watch in {timeout}s:\n{path.read_text()}")


def test_watch_a_digits_job_across_an_api_crash(service_settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    key = generate_key().key
    # A queue of its own: the worker here must not pick up jobs other tests left queued.
    env = service_env(service_settings) | {
        "DDPM_PORT": str(port),
        "DDPM_BOOTSTRAP_API_KEY": key,
        "DDPM_QUEUE": f"ddpm-watch-{port}",
    }
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    watch_out = tmp_path / "watch.txt"
    logs = [tmp_path / "api1.log", tmp_path / "api2.log", tmp_path / "worker.log"]

    with process(api_argv(), env, logs[0]) as api, process(worker_argv(), env, logs[2]):
        wait_ready(base, api, logs[0])
        if EVENTS_PATH not in httpx.get(f"{base}/openapi.json").json()["paths"]:
            pytest.skip("this API has no event stream yet")
        job = httpx.post(f"{base}/v1/jobs", json=DIGITS_JOB, headers=headers, timeout=30).json()

        watch_env = {k: v for k, v in env.items() if not k.startswith("DDPM_")}
        watch_env |= {"DDPM_SERVER": base, "DDPM_API_KEY": key, "COLUMNS": "100"}
        with watch_out.open("wb") as out:
            watcher = subprocess.Popen(
                [str(BIN / "ddpm"), "watch", job["id"]], env=watch_env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_for_text(watch_out, r"step 10/40 ", watcher, timeout=240)
            os.killpg(api.pid, signal.SIGKILL)  # the connection drops mid-stream
            api.wait()
            time.sleep(2)  # the job goes on training while no API answers
            with process(api_argv(), env, logs[1]) as api2:
                wait_ready(base, api2, logs[1])
                code = watcher.wait(timeout=300)
        finally:
            if watcher.poll() is None:
                watcher.kill()
    printed = watch_out.read_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "ddpm-watch.txt").write_text(printed)
    print(f"\n$ ddpm watch {job['id']}\n{printed}")

    assert code == 0, printed + "".join(p.read_text()[-2000:] for p in logs if p.exists())
    metric_steps = [int(m) for m in re.findall(r"^step (\d+)/40 ", printed, flags=re.M)]
    assert metric_steps == list(range(5, 41, 5))  # each point once, across the reconnect
    checkpoints = re.findall(r"checkpoint at step (\d+) \(", printed)
    assert checkpoints == ["20", "40"]
    assert f"job {job['id']} succeeded at step 40/40" in printed
    assert "connection lost" in printed and "reconnecting in" in printed
    assert "Traceback" not in printed
