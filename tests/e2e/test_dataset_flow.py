"""A user's own images, end to end with real processes: upload a zip over HTTP, a Celery worker
prepares it (skipping what is not an image, with the reason), a job trains on it, and its
checkpoint downloads with the data set named in its spec. Then the data set is deleted."""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from app.auth.keys import generate_key
from tests.e2e.conftest import api_argv, free_port, process, wait_for_status, wait_ready, worker_argv

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def images_zip(count: int) -> bytes:
    """`count` 12x10 RGB PNGs (a bright square on a dark ground, moving), a note and a 1x1 PNG."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(count):
            pixels = np.full((10, 12, 3), 20, np.uint8)
            pixels[i % 6 : i % 6 + 4, i % 8 : i % 8 + 4] = (230, 120 + i % 100, 40)
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            archive.writestr(f"shapes/{i:03d}.png", png.getvalue())
        archive.writestr("shapes/README.txt", "not an image")
        tiny = io.BytesIO()
        Image.new("RGB", (1, 1)).save(tiny, format="PNG")
        archive.writestr("shapes/tiny.png", tiny.getvalue())
    return buffer.getvalue()


def wait_for_dataset(client: httpx.Client, dataset_id: str, timeout: float, logs: list[Path]) -> dict:
    deadline = time.monotonic() + timeout
    dataset: dict = {}
    while time.monotonic() < deadline:
        dataset = client.get(f"/v1/datasets/{dataset_id}").json()
        if dataset["status"] in {"ready", "failed"}:
            return dataset
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"data set {dataset_id} still {dataset.get('status')} after {timeout}s:\n{tails}")


def test_upload_prepare_train_download_delete(settings_env: dict[str, str], clean_db, tmp_path: Path) -> None:
    port, key = free_port(), generate_key().key
    env = settings_env | {"DDPM_PORT": str(port), "DDPM_BOOTSTRAP_API_KEY": key}
    api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
    logs = [api_log, worker_log]
    archive = images_zip(48)
    with process(api_argv(), env, api_log) as api, process(worker_argv(), env, worker_log):
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api, api_log)
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as client:
            r = client.post(
                "/v1/datasets", params={"name": "shapes"}, content=archive, headers={"Content-Type": "application/zip"}
            )
            assert r.status_code == 201, r.text
            created = r.json()
            assert created["archive_sha256"] == hashlib.sha256(archive).hexdigest()
            assert created["status"] in {"preparing", "ready"}
            dataset = wait_for_dataset(client, created["id"], 120, logs)
            assert dataset["status"] == "ready", dataset
            assert (dataset["image_count"], dataset["skipped"]) == (48, 2)
            assert dataset["summary"]["sizes"] == [{"width": 12, "height": 10, "count": 48}]
            preview = client.get(f"/v1/datasets/{created['id']}/preview.png")
            assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")

            dataset_spec = {"kind": "dataset", "id": created["id"], "image_size": 8, "channels": 3, "random_flip": True}
            spec = {
                "dataset": dataset_spec,
                "training": {"steps": 20, "batch_size": 16, "log_every": 10, "checkpoint_every": 20},
            }
            r = client.post("/v1/jobs", json=spec)
            assert r.status_code == 201, r.text
            job = r.json()
            assert job["spec"]["dataset"]["image_count"] == 48
            busy = client.delete(f"/v1/datasets/{created['id']}")  # milliseconds after submit: in use
            assert busy.status_code == 409 and job["id"] in busy.text
            job = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, 240, logs)
            assert job["status"] == "succeeded", job

            weights = client.get(f"/v1/jobs/{job['id']}/checkpoints/latest")
            assert weights.status_code == 200
            assert hashlib.sha256(weights.content).hexdigest() == weights.headers["x-checksum-sha256"]
            path = tmp_path / "latest.safetensors"
            path.write_bytes(weights.content)
            with safe_open(str(path), framework="pt") as f:
                saved = json.loads(f.metadata()["spec"])["dataset"]
            assert (saved["kind"], saved["id"], saved["image_count"]) == ("dataset", created["id"], 48)

            assert client.delete(f"/v1/datasets/{created['id']}").status_code == 204
            assert client.get(f"/v1/datasets/{created['id']}").status_code == 404
            gone = client.post("/v1/jobs", json=spec)
            assert gone.status_code == 422 and gone.json()["detail"][0]["loc"] == ["body", "dataset", "id"]
