"""Multi-GPU jobs through the service, on the CPU: a real Celery worker that offers 2 "GPUs" runs a
`resources.gpus: 2` job as 2 gloo ranks; jobs are routed to the workers that can hold them; a
rank killed with SIGKILL loses the attempt and the job resumes like any lost attempt."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.conftest import MakeUser
from tests.e2e.conftest import process, wait_for_status, worker_argv
from tests.worker.ddpm.test_distributed import LOSS_RTOL

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def spec(
    gpus: int,
    steps: int = 40,
    checkpoint_every: int = 20,
    batch_size: int = 16,
    image_size: int = 8,
    sample_every: int = 0,
) -> dict:
    return {
        "dataset": {"image_size": image_size},
        "model": {"preset": "custom", "channels": [16, 32], "norm_groups": 8},
        "diffusion": {"timesteps": 50},
        "training": {
            "steps": steps,
            "batch_size": batch_size,
            "log_every": 5,
            "checkpoint_every": checkpoint_every,
            "sample_every": sample_every,
        },
        "resources": {"gpus": gpus},
    }


def worker_env(settings_env: dict[str, str], gpus: int, memory_gb: int = 8) -> dict[str, str]:
    # One intra-op thread per process: two ranks on a 2-core machine must not oversubscribe it.
    return settings_env | {
        "DDPM_WORKER_GPUS": str(gpus),
        "DDPM_WORKER_GPU_MEMORY_GB": str(memory_gb),
        "OMP_NUM_THREADS": "1",
    }


def losses(client: TestClient, job_id: str) -> list[tuple[int, float]]:
    items = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    return [(p["step"], p["loss"]) for p in items]


def test_a_two_gpu_job_matches_the_one_gpu_job_with_the_same_global_batch(
    clean_db: Settings, settings_env: dict[str, str], tmp_path: Path, make_user: MakeUser
) -> None:
    log = tmp_path / "worker.log"
    with (
        TestClient(create_app(clean_db), headers=make_user().headers) as client,
        process(worker_argv(), worker_env(settings_env, gpus=2), log),
    ):
        one = client.post("/v1/jobs", json=spec(gpus=1)).json()
        two = client.post("/v1/jobs", json=spec(gpus=2, sample_every=40)).json()
        assert two["queue"] == f"{clean_db.queue}.gpus-2.mem-1"
        for job in (one, two):
            done = wait_for_status(client, job["id"], {"succeeded", "failed"}, timeout=300, logs=[log])
            assert done["status"] == "succeeded", done["error"]

        single, ddp = losses(client, one["id"]), losses(client, two["id"])
        assert [s for s, _ in ddp] == [s for s, _ in single] == list(range(5, 41, 5))
        assert [loss for _, loss in ddp] == pytest.approx([loss for _, loss in single], rel=LOSS_RTOL)
        # Rank 0 alone wrote the checkpoints, and the download is the whole file.
        checkpoints = client.get(f"/v1/jobs/{two['id']}/checkpoints").json()
        assert [c["step"] for c in checkpoints] == [20, 40]
        latest = client.get(f"/v1/jobs/{two['id']}/checkpoints/latest")
        assert latest.status_code == 200 and len(latest.content) == checkpoints[-1]["size_bytes"]
        # ... and the sample grid, once.
        assert [s["step"] for s in client.get(f"/v1/jobs/{two['id']}/samples").json()] == [40]
        assert "runs on 2 ranks" in log.read_text()


def test_kill_9_of_one_rank_loses_the_attempt_and_the_job_resumes_from_its_checkpoint(
    clean_db: Settings, settings_env: dict[str, str], tmp_path: Path, make_user: MakeUser
) -> None:
    log = tmp_path / "worker.log"
    with (
        TestClient(create_app(clean_db), headers=make_user().headers) as client,
        process(worker_argv(), worker_env(settings_env, gpus=2), log),
    ):
        job_id = client.post("/v1/jobs", json=spec(gpus=2, steps=300, checkpoint_every=25)).json()["id"]
        deadline = time.monotonic() + 240
        while client.get(f"/v1/jobs/{job_id}/checkpoints").json() == [] and time.monotonic() < deadline:
            time.sleep(0.2)
        found = re.search(rf"job {job_id}: attempt 1 runs on 2 ranks, pids \[(\d+), (\d+)\]", log.read_text())
        assert found, log.read_text()[-3000:]
        rank1 = int(found.group(2))
        os.kill(rank1, signal.SIGKILL)

        done = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=300, logs=[log])
        assert done["status"] == "succeeded", done["error"]
        assert done["attempt"] == 2
        text = log.read_text()
        assert f"attempt 1 lost: rank 1 (pid {rank1}) terminated with signal SIGKILL" in text
        # The second attempt resumed from a checkpoint of the first, and re-did only what followed it.
        steps = [s for s, _ in losses(client, job_id)]
        assert steps == list(range(5, 301, 5))
        resumed_from = re.search(
            rf"job {job_id}: attempt 2 claimed by .* \(resume from .*step-(\d+)\.safetensors\)", text
        )
        assert resumed_from and int(resumed_from.group(1)) >= 25, text[-3000:]


def test_sigterm_checkpoints_all_ranks_at_one_step_and_a_cancel_stops_them(
    clean_db: Settings, settings_env: dict[str, str], tmp_path: Path, make_user: MakeUser
) -> None:
    """The worker alone gets SIGTERM (as from `docker stop`): rank 0 checkpoints at its next log
    point, every rank stops there, the job is re-queued; the next attempt resumes and is cancelled."""
    with TestClient(create_app(clean_db), headers=make_user().headers) as client:
        job_id = client.post("/v1/jobs", json=spec(gpus=2, steps=100_000, checkpoint_every=10_000)).json()["id"]
        log = tmp_path / "worker-1.log"
        with process(worker_argv(), worker_env(settings_env, gpus=2), log) as worker:
            deadline = time.monotonic() + 240
            while client.get(f"/v1/jobs/{job_id}").json()["step"] < 20 and time.monotonic() < deadline:
                time.sleep(0.2)
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=90)
            assert worker.returncode == 0, log.read_text()[-3000:]
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued", job
        assert [c["step"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()] == [job["step"]]

        log2 = tmp_path / "worker-2.log"
        with process(worker_argv(), worker_env(settings_env, gpus=2), log2):
            deadline = time.monotonic() + 240
            while client.get(f"/v1/jobs/{job_id}").json()["step"] < job["step"] + 10 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.get(f"/v1/jobs/{job_id}").json()["attempt"] == 2  # a new attempt; the stop is not lost
            client.post(f"/v1/jobs/{job_id}/cancel")
            done = wait_for_status(client, job_id, {"cancelled", "failed"}, timeout=120, logs=[log2])
            assert done["status"] == "cancelled", done["error"]
            # Every rank left the loop together (none hangs in a collective): the task returns.
            finished = re.compile(r"Task jobs\.train\[.*\] succeeded")
            deadline = time.monotonic() + 60
            while not finished.search(log2.read_text()) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert finished.search(log2.read_text()), log2.read_text()[-3000:]


def test_jobs_land_only_on_workers_that_can_hold_them(
    clean_db: Settings, settings_env: dict[str, str], tmp_path: Path, make_user: MakeUser
) -> None:
    """Worker A offers 1 GPU with 1 GiB, worker B 2 GPUs with 4 GiB each."""
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    with (
        TestClient(create_app(clean_db), headers=make_user().headers) as client,
        process(worker_argv(), worker_env(settings_env, gpus=1, memory_gb=1), logs[0]) as a,
        process(worker_argv(), worker_env(settings_env, gpus=2, memory_gb=4), logs[1]) as b,
    ):
        # No running worker can hold these: 3 GPUs; or 1 GPU with more memory than either offers
        # (batch 128 of the 35.7M-parameter network). They stay queued, and say why.
        three = client.post("/v1/jobs", json=spec(gpus=3, steps=5, batch_size=18)).json()
        cifar = {"model": {"preset": "ddpm-cifar10"}, "dataset": {"image_size": 32}, "training": {"batch_size": 128}}
        big = client.post("/v1/jobs", json=cifar).json()
        assert big["queue"] == f"{clean_db.queue}.gpus-1.mem-8"
        # Only B can hold these: 2 GPUs; 1 GPU with about 1.6 GiB (more than A's 1 GiB). Either can hold the rest.
        two = client.post("/v1/jobs", json=spec(gpus=2, steps=10)).json()
        roomy = client.post("/v1/jobs", json=spec(gpus=1, steps=1, batch_size=512, image_size=32)).json()
        assert roomy["queue"] == f"{clean_db.queue}.gpus-1.mem-2"
        small = [client.post("/v1/jobs", json=spec(gpus=1, steps=10)).json() for _ in range(3)]

        ran_on = {}
        for job in (two, roomy, *small):
            done = wait_for_status(client, job["id"], {"succeeded", "failed"}, timeout=300, logs=logs)
            assert done["status"] == "succeeded", done["error"]
            ran_on[job["id"]] = {f":{a.pid}": "a", f":{b.pid}": "b"}[done["worker"][done["worker"].rindex(":") :]]
        assert ran_on[two["id"]] == ran_on[roomy["id"]] == "b"
        assert {ran_on[job["id"]] for job in small} <= {"a", "b"}

        for job in (three, big):
            waiting = client.get(f"/v1/jobs/{job['id']}").json()
            assert waiting["status"] == "queued" and waiting["started_at"] is None
            assert waiting["waiting_reason"].startswith("no running worker can hold this job"), waiting
        reason_three = client.get(f"/v1/jobs/{three['id']}").json()["waiting_reason"]
        reason_big = client.get(f"/v1/jobs/{big['id']}").json()["waiting_reason"]
        assert "needs 3 GPUs" in reason_three and "offers 2 GPUs with 4 GiB each" in reason_three
        assert "needs 1 GPU with 8 GiB each" in reason_big
