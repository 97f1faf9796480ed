"""Export of a checkpoint as a diffusers pipeline: the zip loads with DDPMPipeline and samples."""

from __future__ import annotations

import io
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMPipeline
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.models import Checkpoint
from app.spec import JobSpec
from worker.ddpm.trainer import train

SPEC = {
    "dataset": {"image_size": 8},
    "diffusion": {"timesteps": 20, "prediction": "v", "beta_schedule": "cosine"},
    "training": {"steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "sample_every": 0},
}


class _Quiet:
    def on_log(self, point) -> None:  # type: ignore[no-untyped-def]
        pass

    def on_checkpoint(self, saved) -> None:  # type: ignore[no-untyped-def]
        self.saved = saved


def test_export_loads_into_ddpm_pipeline_and_samples(client: TestClient, clean_db: Settings, tmp_path: Path) -> None:
    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
    sink = _Quiet()
    train(JobSpec.model_validate(SPEC), clean_db.checkpoint_root / job_id, sink, device="cpu")
    saved = sink.saved
    with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
        s.add(
            Checkpoint(
                job_id=uuid.UUID(job_id),
                step=2,
                path=f"{job_id}/{saved.path.name}",
                size_bytes=saved.size_bytes,
                sha256=saved.sha256,
                state_path=f"{job_id}/{saved.state_path.name}",
            )
        )

    r = client.get(f"/v1/jobs/{job_id}/checkpoints/2/export", params={"format": "diffusers"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    folder = tmp_path / "pipeline"
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        assert sorted(archive.namelist()) == [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
        ]
        archive.extractall(folder)

    pipeline = DDPMPipeline.from_pretrained(folder)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pipeline.scheduler.config.num_train_timesteps == 20
    images = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                      output_type="np").images  # fmt: skip
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()

    # `latest` names the same checkpoint (it downloads, and it exports).
    latest = client.get(f"/v1/jobs/{job_id}/checkpoints/latest/export")
    assert latest.status_code == 200, latest.text
    assert latest.headers["content-disposition"] == r.headers["content-disposition"]
    assert f"{job_id}-step-00000002-diffusers.zip" in latest.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(latest.content)) as a, zipfile.ZipFile(io.BytesIO(r.content)) as b:
        assert {n: a.read(n) for n in a.namelist()} == {n: b.read(n) for n in b.namelist()}
    assert client.get(f"/v1/jobs/{job_id}/checkpoints/4/export").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/checkpoints/2/export", params={"format": "onnx"}).status_code == 422
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/checkpoints/2/export").status_code == 404
