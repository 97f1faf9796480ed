"""POST /v1/jobs/{id}/sample end to end, with the worker's side run in-process."""

from __future__ import annotations

import io
import uuid
from datetime import timedelta

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Checkpoint, SampleRequest, utcnow
from app.routing import Resources
from app.spec import JobSpec
from tests.conftest import MakeUser
from worker.ddpm.trainer import train
from worker.sample_task import draw_requested_samples
from worker.sweeper import check_in, sweep_once

SPEC = {
    "dataset": {"image_size": 8},
    "diffusion": {"timesteps": 30},
    "training": {"steps": 2, "batch_size": 4, "log_every": 1, "checkpoint_every": 2, "sample_every": 0},
}


class _Keep:
    def on_log(self, point) -> None:  # type: ignore[no-untyped-def]
        pass

    def on_checkpoint(self, saved) -> None:  # type: ignore[no-untyped-def]
        self.saved = saved


def test_a_sample_request_draws_a_grid_and_an_npz(clean_db: Settings, make_user: MakeUser) -> None:
    factory = make_sessionmaker(make_engine(clean_db))
    with TestClient(create_app(clean_db), headers=make_user("sampler").headers) as client:
        job_id = client.post("/v1/jobs", json=SPEC).json()["id"]
        assert client.post(f"/v1/jobs/{job_id}/sample", json={}).status_code == 409  # no checkpoint yet

        sink = _Keep()
        train(JobSpec.model_validate(SPEC), clean_db.checkpoint_root / job_id, sink, device="cpu")
        with session_scope(factory) as s:
            s.add(
                Checkpoint(
                    job_id=uuid.UUID(job_id),
                    step=2,
                    path=f"{job_id}/{sink.saved.path.name}",
                    size_bytes=sink.saved.size_bytes,
                    sha256=sink.saved.sha256,
                    state_path=f"{job_id}/{sink.saved.state_path.name}",
                )
            )
        bad = client.post(f"/v1/jobs/{job_id}/sample", json={"sampler": "ddpm", "steps": 5})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "steps"]
        assert client.post(f"/v1/jobs/{job_id}/sample", json={"checkpoint_step": 7}).status_code == 404

        r = client.post(f"/v1/jobs/{job_id}/sample", json={"count": 4, "seed": 3, "sampler": "ddim", "steps": 5})
        assert r.status_code == 202, r.text
        request = r.json()
        assert (request["status"], request["checkpoint_step"], request["steps"]) == ("queued", 2, 5)
        assert request["png_url"] is None
        assert client.get(f"/v1/jobs/{job_id}/sample/{request['id']}.png").status_code == 409

        assert draw_requested_samples(clean_db, factory, uuid.UUID(request["id"])) == "succeeded"
        assert draw_requested_samples(clean_db, factory, uuid.UUID(request["id"])) == "skipped"  # re-delivery

        done = client.get(f"/v1/jobs/{job_id}/sample/{request['id']}").json()
        assert done["status"] == "succeeded" and done["finished_at"]
        png = client.get(done["png_url"])
        assert png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (19, 19)  # 2x2 grid of 8x8, 1 px padding
        npz = np.load(io.BytesIO(client.get(done["npz_url"]).content))
        assert npz["images"].shape == (4, 8, 8, 1) and npz["images"].dtype == np.uint8

        ddpm = client.post(f"/v1/jobs/{job_id}/sample", json={"sampler": "ddpm", "count": 1}).json()
        assert ddpm["steps"] == 30  # the full chain
        other = make_user("stranger")
        assert client.get(f"/v1/jobs/{job_id}/sample/{request['id']}", headers=other.headers).status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/sample/{uuid.uuid4()}").status_code == 404


def test_a_request_whose_worker_died_mid_draw_is_queued_and_sent_again(clean_db: Settings, make_user: MakeUser) -> None:
    factory = make_sessionmaker(make_engine(clean_db))
    with TestClient(create_app(clean_db), headers=make_user("sampler").headers) as client:
        job_id = uuid.UUID(client.post("/v1/jobs", json=SPEC).json()["id"])
    with session_scope(factory) as s:
        s.add(Checkpoint(job_id=job_id, step=2, path="x", size_bytes=1, sha256="0" * 64, state_path="y"))
        s.flush()
        dead, alive = (
            SampleRequest(job_id=job_id, checkpoint_step=2, count=1, seed=0, sampler="ddim", steps=5, status="running")
            for _ in range(2)
        )
        dead.worker, alive.worker = "gone-host:1", "live-host:2"
        s.add_all([dead, alive])
    # The live one is a samples-only worker (serve's second worker, compose's worker-samples).
    check_in(factory, "live-host:2", clean_db, Resources(1, 8), "cpu", sweep=False)

    sent: list[str] = []

    class Recorder:
        def send_train(self, job: str, queue: str) -> None:
            pass

        def send_sample(self, request: str) -> None:
            sent.append(request)

    sweep_once(clean_db, factory, Recorder())
    with session_scope(factory) as s:
        states = {r.id: (r.status, r.worker) for r in s.scalars(select(SampleRequest))}
    assert states == {dead.id: ("queued", None), alive.id: ("running", "live-host:2")}
    assert sent == [str(dead.id)]
    # Re-delivered, the request is drawn as any other (here: claimed and failed on the fake checkpoint).
    assert draw_requested_samples(clean_db, factory, dead.id) == "failed"


def test_a_request_made_while_the_broker_is_down_is_queued_and_the_sweeper_sends_it(
    clean_db: Settings, make_user: MakeUser
) -> None:
    factory = make_sessionmaker(make_engine(clean_db))
    user = make_user("sampler")
    with TestClient(create_app(clean_db), headers=user.headers) as client:
        job_id = uuid.UUID(client.post("/v1/jobs", json=SPEC).json()["id"])
    with session_scope(factory) as s:
        s.add(Checkpoint(job_id=job_id, step=2, path="x", size_bytes=1, sha256="0" * 64, state_path="y"))
    down = clean_db.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down), headers=user.headers) as client:
        r = client.post(f"/v1/jobs/{job_id}/sample", json={})
    assert r.status_code == 202, r.text
    request_id = uuid.UUID(r.json()["id"])
    with session_scope(factory) as s:
        request = s.get(SampleRequest, request_id)
        assert request is not None
        assert (request.status, request.dispatched_at) == ("queued", None)
        request.created_at = utcnow() - timedelta(hours=1)

    sent: list[str] = []

    class Recorder:  # the broker is back
        def send_train(self, job: str, queue: str) -> None:
            pass

        def send_sample(self, request: str) -> None:
            sent.append(request)

    sweep_once(clean_db, factory, Recorder())
    assert sent == [str(request_id)]
    with session_scope(factory) as s:
        assert s.get(SampleRequest, request_id).dispatched_at is not None  # type: ignore[union-attr]
    # Sent just now: not sent again on the next pass.
    sweep_once(clean_db, factory, Recorder())
    assert sent == [str(request_id)]
