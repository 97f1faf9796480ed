"""Benchmark 3: the API with a real API process and a real worker (PostgreSQL + Redis).

- POST /v1/jobs -> `running`: wall time from just before the POST to the job's `started_at`
  (set by the worker's claim), for one small job after another with the worker idle.
- GET /v1/jobs/{id}: requests/s from a second process on loopback (`wrk` if installed, else
  `python -m bench.load`, httpx threads), with the worker idle.
- 200 SSE watchers on a running job: pending issue 5 until `/v1/jobs/{id}/events` exists.

Every request carries `Authorization: Bearer <key>`: the key comes from --api-key or
$DDPM_API_KEY, else a fresh one; the API is started with it as DDPM_BOOTSTRAP_API_KEY.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from app.auth.keys import generate_key
from app.cli import WORKER_COMMAND
from app.config import Settings
from app.db import upgrade_database
from app.spec import TrainingSpec
from bench.common import Rounds, machine, process, service_env, throwaway_database
from worker.ddpm.distributed import free_port as free_port  # also bench.capacity's

BIN = Path(sys.executable).parent
# Samples off where the spec has them (issue 5's sample grids would otherwise cost the jobs time).
_NO_SAMPLES = {"sample_every": 0} if "sample_every" in TrainingSpec.model_fields else {}
SMALL_JOB = {
    "name": "bench",
    "dataset": {"image_size": 8},
    "training": {"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 2, **_NO_SAMPLES},
}


def long_job(short: bool) -> dict[str, Any]:
    """A job that trains until cancelled: the one the SSE watchers watch."""
    size, batch = (8, 8) if short else (16, 32)
    training = {"steps": 1_000_000, "batch_size": batch, "log_every": 5, "checkpoint_every": 1_000_000}
    return {"name": "bench watched", "dataset": {"image_size": size}, "training": training | _NO_SAMPLES}


EVENTS_ROUTE = "/v1/jobs/{job_id}/events"
WATCHERS = 200


def watcher_count(short: bool) -> int:
    return 10 if short else WATCHERS  # short mode proves the path; 200 streams on a CI box prove nothing


def wait_ready(client: httpx.Client, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if client.get("/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the API did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


def wait_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float, poll_s: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(poll_s)
    raise RuntimeError(f"job {job_id} still {job['status']} after {timeout}s")


def post_to_running(client: httpx.Client) -> float:
    """Seconds from just before POST /v1/jobs to the claim that made the job `running`."""
    before = time.time()
    created = client.post("/v1/jobs", json=SMALL_JOB)
    created.raise_for_status()
    job_id = created.json()["id"]
    job = wait_status(client, job_id, {"running", "succeeded", "failed", "cancelled"}, timeout=60, poll_s=0.02)
    if job["started_at"] is None:
        raise RuntimeError(f"job {job_id} is {job['status']} without started_at")
    latency = datetime.fromisoformat(job["started_at"]).timestamp() - before
    done = wait_status(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=120, poll_s=0.1)
    if done["status"] != "succeeded":
        raise RuntimeError(f"benchmark job {job_id} ended {done['status']}: {done.get('error')}")
    return latency


def get_rate(url: str, key: str, seconds: float) -> dict[str, Any]:
    """Requests/s of GET `url` from a second process: wrk if installed, else bench.load."""
    header = f"Authorization: Bearer {key}"
    wrk = shutil.which("wrk")
    if wrk:
        out = subprocess.run(
            [wrk, "-t2", "-c16", f"-d{max(1, round(seconds))}s", "--latency", "-H", header, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        return {
            "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50_ms": _wrk_ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
            "p99_ms": _wrk_ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),  # type: ignore[union-attr]
            "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
            "tool": "wrk -t2 -c16",
        }
    argv = [sys.executable, "-m", "bench.load", url, "--seconds", str(seconds), "--threads", "4", "--header", header]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def _wrk_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(\w+)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def watcher_cost(client: httpx.Client, base: str, key: str, short: bool, connected: list[int]) -> Rounds:
    """Training images/s of a running job in phases without and with WATCHERS SSE streams, alternated.

    A phase's figure is the median of the trainer's own per-window images/s over the metric points
    the job wrote during it. The watchers run in a second process on this same machine; how many
    got a stream (HTTP 200) is appended to `connected`, one entry per phase with watchers.
    """
    phase_s, rounds = (2.0, 1) if short else (10.0, 3)
    watchers = watcher_count(short)
    created = client.post("/v1/jobs", json=long_job(short))
    created.raise_for_status()
    job_id = created.json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}").json()["step"] == 0:  # past the job's start-up
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not start training in 60 s")
        time.sleep(0.1)

    def window_rate(seconds: float) -> float:
        after = client.get(f"/v1/jobs/{job_id}").json()["step"]
        time.sleep(seconds)
        items = client.get(f"/v1/jobs/{job_id}/metrics", params={"after_step": after}).json()["items"]
        if not items:
            raise RuntimeError(f"job {job_id} wrote no metric point in {seconds:.0f} s")
        return statistics.median(item["images_per_s"] for item in items)

    def with_watchers() -> float:
        # Every point the job writes while the watcher process runs (connecting included) counts;
        # the API is read only before and after, as the streams may hold its database pool.
        after = client.get(f"/v1/jobs/{job_id}").json()["step"]
        argv = [sys.executable, "-m", "bench.watchers", f"{base}/v1/jobs/{job_id}/events"]
        argv += ["--count", str(watchers), "--seconds", str(phase_s), "--header", f"Authorization: Bearer {key}"]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
            out, _ = proc.communicate(timeout=120)
        items = client.get(f"/v1/jobs/{job_id}/metrics", params={"after_step": after}).json()["items"]
        if not items:
            raise RuntimeError(f"job {job_id} wrote no metric point in {phase_s:.0f} s")
        rate = statistics.median(item["images_per_s"] for item in items)
        seen = json.loads(out.splitlines()[-1])
        connected.append(seen["connected"])
        short_of = "" if seen["connected"] == watchers else f" (ONLY {seen['connected']} of {watchers})"
        print(f"       {seen['connected']} watchers connected{short_of}, {seen['events']} events received")
        return rate

    try:
        contenders = {"no watchers": lambda: window_rate(phase_s), f"{watchers} watchers": with_watchers}
        return Rounds().run(rounds, contenders)
    finally:
        client.post(f"/v1/jobs/{job_id}/cancel")
        wait_status(client, job_id, {"cancelled", "succeeded", "failed"}, timeout=60, poll_s=0.2)


def run(short: bool = False, api_key: str | None = None) -> dict[str, Any]:
    key = api_key or os.environ.get("DDPM_API_KEY") or generate_key().key
    jobs, seconds = (2, 1.0) if short else (20, 10.0)
    print(f"== api: POST->running, GET requests/s, SSE watchers\n   {machine()}")
    with ExitStack() as stack:
        url = stack.enter_context(throwaway_database())
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-api-")))
        port = free_port()
        env = service_env(url, data, port, key, DDPM_MAX_QUEUED_JOBS_PER_USER="1000")
        # The worker trains on one core, leaving the other to the API, the database and the load
        # generators on this 2-core machine (two OpenMP threads would spin against them).
        worker_env = env | {"OMP_NUM_THREADS": "1"}
        upgrade_database(Settings(database_url=url, data_dir=data))
        api_log, worker_log = data / "api.log", data / "worker.log"
        api = stack.enter_context(process([str(BIN / "ddpm-jobs"), "api"], env, api_log))
        stack.enter_context(process([str(BIN / WORKER_COMMAND[0]), *WORKER_COMMAND[1:]], worker_env, worker_log))
        base = f"http://127.0.0.1:{port}"
        client = stack.enter_context(
            httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"})
        )
        wait_ready(client, api, api_log)
        post_to_running(client)  # warm-up: the worker's first job imports torch and connects

        latencies = [post_to_running(client) for _ in range(jobs)]
        p99 = sorted(latencies)[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"-- POST /v1/jobs -> running (worker idle, {jobs} jobs one after another)")
        print(
            f"  median {statistics.median(latencies) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, "
            f"min {min(latencies) * 1e3:.0f} ms, max {max(latencies) * 1e3:.0f} ms"
        )

        job_id = client.get("/v1/jobs", params={"limit": 1}).json()["items"][0]["id"]
        rate = get_rate(f"{base}/v1/jobs/{job_id}", key, seconds)
        print(f"-- GET /v1/jobs/{{id}} for {seconds:.0f} s ({rate['tool']}, loopback, worker idle)")
        print(
            f"  {rate['requests_per_s']:.0f} requests/s, p50 {rate['p50_ms']:.1f} ms, p99 {rate['p99_ms']:.1f} ms, "
            f"non-2xx {rate['non_2xx']}"
        )

        routes = client.get("/openapi.json").json().get("paths", {})
        job = long_job(short)
        shape = f"{job['dataset']['image_size']}px, batch {job['training']['batch_size']}"
        count = watcher_count(short)
        print(f"-- {count} SSE watchers on a running job (tiny, {shape}; watchers in a second process)")
        watchers: float | str
        if EVENTS_ROUTE not in routes:
            print(f"  pending issue 5: the API has no {EVENTS_ROUTE} route yet")
            watchers = "pending issue 5"
        else:
            connected: list[int] = []
            rounds = watcher_cost(client, base, key, short, connected)
            print(rounds.report("images/s"))
            watchers = rounds.ratio(f"{count} watchers", "no watchers")
            print(f"  ratio with / without watchers: {watchers:.3f} (training throughput kept)")
            if min(connected) < count:
                print(f"  NOTE: at most {max(connected)} of {count} streams were served at once")
    return {
        "post_to_running_median_s": statistics.median(latencies),
        "post_to_running_p99_s": p99,
        "get_requests_per_s": rate["requests_per_s"],
        "watchers": watchers,
    }
