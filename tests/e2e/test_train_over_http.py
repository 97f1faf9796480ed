"""The whole flow with real processes: POST a small digits job, a Celery worker trains it,
the loss falls, the latest checkpoint downloads with a matching sha256 and loads into
diffusers' UNet2DModel. Once against PostgreSQL + Redis, once on the embedded default."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import torch
from diffusers import UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from app.auth.keys import generate_key
from app.spec import JobSpec
from tests.e2e.conftest import (
    BIN,
    api_argv,
    free_port,
    process,
    wait_for_status,
    wait_ready,
    worker_argv,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SMALL_JOB = {
    "name": "e2e digits",
    "dataset": {"kind": "digits", "image_size": 8},
    "training": {
        "steps": 60,
        "batch_size": 32,
        "learning_rate": 2e-3,
        "warmup_steps": 5,
        "log_every": 10,
        "checkpoint_every": 20,
        "keep_checkpoints": 2,
    },
    "evaluation": {"every": 30, "samples": 64, "steps": 5},  # the digits classifier's FID: seconds on a CPU
}


def check_full_flow(client: httpx.Client, logs: list[Path], tmp_path: Path) -> dict:
    created = client.post("/v1/jobs", json=SMALL_JOB)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    started = time.monotonic()
    job = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=240, logs=logs)
    wall = time.monotonic() - started
    assert job["status"] == "succeeded", job
    assert (job["step"], job["total_steps"], job["attempt"]) == (60, 60, 1)
    assert job["started_at"] and job["finished_at"]

    metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    steps = [m["step"] for m in metrics]
    assert steps == list(range(10, 61, 10))
    first, last = metrics[0]["loss"], metrics[-1]["loss"]
    assert last < first * 0.8, metrics
    assert job["loss"] == pytest.approx(last)

    checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
    assert [c["step"] for c in checkpoints] == [40, 60]  # keep_checkpoints=2 pruned step 20
    r = client.get(f"/v1/jobs/{job_id}/checkpoints/latest")
    assert r.status_code == 200
    sha = hashlib.sha256(r.content).hexdigest()
    assert sha == checkpoints[-1]["sha256"] == r.headers["x-checksum-sha256"]
    path = tmp_path / "latest.safetensors"
    path.write_bytes(r.content)
    check_evaluations(client, job_id, metrics, checkpoints)

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert JobSpec.model_validate_json(meta["spec"]) == JobSpec.model_validate(SMALL_JOB)
    unet = UNet2DModel.from_config(json.loads(meta["unet_config"]))
    loaded = unet.load_state_dict(load_file(str(path)), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    with torch.no_grad():
        out = unet(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999])).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    # The worker's own lines for the job, written by the real worker process (worker/job_log.py).
    lines = client.get(f"/v1/jobs/{job_id}/logs").json()["items"]
    assert lines and {line["attempt"] for line in lines} == {1}
    assert (lines[-1]["logger"], lines[-1]["message"]) == ("worker.attempt", f"job {job_id}: attempt 1 ended succeeded")
    print(f"\ne2e job {job_id}: wall {wall:.1f}s, loss {first:.4f} -> {last:.4f}")
    return job


def check_evaluations(client: httpx.Client, job_id: str, metrics: list[dict], checkpoints: list[dict]) -> None:
    """FID at steps 30 and 60, listed and in the event stream; the best evaluated checkpoint is
    step 60's (the one at 30 was pruned, never kept); each metric point has its loss per tenth of t."""
    evaluations = client.get(f"/v1/jobs/{job_id}/evaluations").json()
    assert [(e["step"], e["samples"], e["reference_images"], e["feature_network"]) for e in evaluations] == [
        (30, 64, 1797, "digits-classifier"),
        (60, 64, 1797, "digits-classifier"),
    ]
    assert all(e["fid"] > 0 and e["seconds"] > 0 for e in evaluations)
    events = client.get(f"/v1/jobs/{job_id}/events").text
    assert "event: evaluation\nid: 30.3\n" in events and "event: evaluation\nid: 60.3\n" in events
    best = client.get(f"/v1/jobs/{job_id}/checkpoints/best")
    assert best.status_code == 200 and hashlib.sha256(best.content).hexdigest() == checkpoints[-1]["sha256"]
    assert all(len(m["loss_by_t"]) == 10 for m in metrics)


def test_postgres_redis_api_and_celery_worker(settings_env: dict[str, str], clean_db, tmp_path: Path) -> None:
    port = free_port()
    key = generate_key().key  # as compose passes DDPM_BOOTSTRAP_API_KEY to the API
    env = settings_env | {"DDPM_PORT": str(port), "DDPM_BOOTSTRAP_API_KEY": key}
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    with process(api_argv(), env, api_log) as api, process(worker_argv(), env, worker_log):
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api, api_log)
        assert httpx.get(f"{base}/v1/jobs").status_code == 401
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            assert client.get("/readyz").json() == {"status": "ok"}
            check_full_flow(client, [api_log, worker_log], tmp_path)


def test_embedded_default_serve(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPM_")}
    env |= {"DDPM_DATA_DIR": str(tmp_path / "var"), "DDPM_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "serve.log"
    with process([str(BIN / "ddpm-jobs"), "serve"], env, log) as serve:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, serve, log, timeout=90)
        # The first start made an admin key and saved it where README's curl examples read it.
        key_file = tmp_path / "var" / "api-key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert key in log.read_text()
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{base}/v1/jobs").status_code == 401
        with httpx.Client(base_url=base, timeout=30, headers=headers) as client:
            job = check_full_flow(client, [log], tmp_path)
            # The default data root exists, so the API checks a folder data set at submit.
            assert (tmp_path / "var" / "datasets").is_dir()
            missing = client.post("/v1/jobs", json={"dataset": {"kind": "folder", "path": "mnist"}})
            assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "dataset", "path"]
    assert (tmp_path / "var" / "ddpm.db").exists()
    # Restarted, the embedded service still has the job, and the same key (no new one is made).
    with process([str(BIN / "ddpm-jobs"), "serve"], env, tmp_path / "serve2.log") as serve:
        wait_ready(base, serve, tmp_path / "serve2.log", timeout=90)
        again = httpx.get(f"{base}/v1/jobs/{job['id']}", headers=headers).json()
    assert again["status"] == "succeeded" and again["step"] == 60
    assert key_file.read_text().strip() == key
