"""The whole flow with DDPM_STORAGE=s3: real API and Celery worker processes, checkpoints in a
bucket of a real S3 server (moto on loopback). Submit, train, list, download (whole and a
Range), export; the bucket holds exactly the files the rows point at."""

from __future__ import annotations

import hashlib
import io
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from app.auth.keys import generate_key
from app.config import Settings
from tests.conftest import bucket_keys, service_env
from tests.e2e.conftest import api_argv, free_port, process, wait_for_status, wait_ready, worker_argv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB = {
    "name": "e2e s3",
    "dataset": {"kind": "digits", "image_size": 8},
    "diffusion": {"timesteps": 50},
    "training": {
        "steps": 30,
        "batch_size": 16,
        "log_every": 10,
        "checkpoint_every": 10,
        "keep_checkpoints": 2,
        "sample_every": 0,
    },
}


@pytest.mark.parametrize("gpus", [1, 2], ids=["1-gpu", "2-gpu-ddp"])
def test_submit_train_download_export_with_s3_storage(s3_settings: Settings, tmp_path: Path, gpus: int) -> None:
    """With 2 GPUs (2 gloo ranks on this CPU), rank 0 uploads and records as a single process does."""
    port = free_port()
    key = generate_key().key
    env = service_env(s3_settings) | {"DDPM_PORT": str(port), "DDPM_BOOTSTRAP_API_KEY": key}
    env |= {"DDPM_WORKER_GPUS": str(gpus), "OMP_NUM_THREADS": "1"}
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    with process(api_argv(), env, api_log) as api, process(worker_argv(), env, worker_log):
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api, api_log)
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            created = client.post("/v1/jobs", json=JOB | {"resources": {"gpus": gpus}})
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            started = time.monotonic()
            job = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"}, 120, [api_log, worker_log])
            assert job["status"] == "succeeded", job
            assert job["step"] == 30

            checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
            assert [c["step"] for c in checkpoints] == [20, 30]  # keep_checkpoints=2 pruned step 10
            latest = client.get(f"/v1/jobs/{job_id}/checkpoints/latest")
            assert latest.status_code == 200
            sha = hashlib.sha256(latest.content).hexdigest()
            assert sha == checkpoints[-1]["sha256"] == latest.headers["x-checksum-sha256"]
            assert len(latest.content) == checkpoints[-1]["size_bytes"]

            part = client.get(f"/v1/jobs/{job_id}/checkpoints/20", headers={"Range": "bytes=0-99"})
            assert part.status_code == 206
            assert part.headers["content-range"] == f"bytes 0-99/{checkpoints[0]['size_bytes']}"
            whole = client.get(f"/v1/jobs/{job_id}/checkpoints/20").content
            assert part.content == whole[:100]

            exported = client.get(f"/v1/jobs/{job_id}/checkpoints/30/export")
            assert exported.status_code == 200, exported.text
            with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
                assert sorted(archive.namelist()) == [
                    "model_index.json",
                    "scheduler/scheduler_config.json",
                    "unet/config.json",
                    "unet/diffusion_pytorch_model.safetensors",
                ]
                assert archive.read("unet/diffusion_pytorch_model.safetensors") == latest.content

            samples = client.get(f"/v1/jobs/{job_id}/samples").json()
            print(f"\ne2e s3 job {job_id}: {time.monotonic() - started:.1f}s")

    stored = {k.removeprefix("ckpt/") for k in bucket_keys(s3_settings) if k.startswith(f"ckpt/{job_id}/")}
    weights = {f"{job_id}/attempt-1/step-{step:08d}.safetensors" for step in (20, 30)}
    states = {w.replace(".safetensors", ".state.safetensors") for w in weights}
    grids = {f"{job_id}/attempt-1/samples/step-{s['step']:08d}.png" for s in samples}
    assert stored == weights | states | grids
    scratch = s3_settings.checkpoint_root / job_id
    assert not scratch.exists() or not [p for p in scratch.rglob("*") if p.is_file()]
