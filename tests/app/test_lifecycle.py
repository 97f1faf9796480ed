"""DELETE /v1/jobs/{id} and POST /v1/jobs/{id}/continue through the API, against the real
PostgreSQL and Redis: who may, in which states, what goes, and what a refusal says."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.jobs import lifecycle
from app.main import create_app
from app.models import (
    Checkpoint,
    Job,
    JobAttempt,
    JobEvent,
    JobLogLine,
    MetricPoint,
    Sample,
    SampleRequest,
    User,
    utcnow,
)
from tests.conftest import ApiUser, MakeUser, evaluation_row


def _finish(settings: Settings, job_id: str, status: str = "succeeded", **values: Any) -> None:
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(status=status, finished_at=utcnow(), **values))


def _stored_job(settings: Settings, job_id: str) -> list[str]:
    """Rows and files of every kind a trained job owns (made up, as a worker leaves them); the files."""
    jid, root = uuid.UUID(job_id), settings.checkpoint_root
    files = [f"{job_id}/attempt-1/step-00000010.safetensors", f"{job_id}/attempt-1/samples/step-00000010.png"]
    request_id = uuid.uuid4()
    files.append(f"sample-requests/{request_id}/grid.png")
    for key in files:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(key.encode())
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        owner = s.get(Job, jid).owner_id  # type: ignore[union-attr]
        s.add(MetricPoint(job_id=jid, step=10, loss=0.5, lr=1e-4, images_per_s=1.0))
        s.add(Checkpoint(job_id=jid, step=10, path=files[0], size_bytes=1, sha256="0" * 64, state_path=files[0]))
        s.add(Sample(job_id=jid, step=10, path=files[1], size_bytes=1, sha256="0" * 64))
        s.add(evaluation_row(job_id, 10, 1.0, kid=0.1, kid_std=0.0, samples=1, reference_images=1, seconds=1.0))
        s.add(JobLogLine(job_id=jid, attempt=1, seq=0, at=utcnow(), level="INFO", logger="w", message="hi"))
        s.add(JobEvent(job_id=jid, attempt=1, step=3, kind="compile_failed", message="eager", detail={"error": "x"}))
        s.add(JobAttempt(job_id=jid, owner_id=owner, attempt=1, worker="w", device="cpu", gpus=1))
        s.add(
            SampleRequest(
                id=request_id, job_id=jid, checkpoint_step=10, count=1, seed=0, sampler="ddim", steps=5,
                status="succeeded", png_path=files[2], png_sha256=hashlib.sha256(files[2].encode()).hexdigest(),
            )
        )  # fmt: skip
    return files


def _rows(settings: Settings, job_id: str) -> dict[str, int]:
    jid = uuid.UUID(job_id)
    tables = (Job, MetricPoint, Checkpoint, Sample, SampleRequest, JobLogLine, JobEvent)
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        counts = {t.__tablename__: s.scalar(select(func.count()).where(_job_column(t) == jid)) or 0 for t in tables}
        counts["job_attempts (job_id null)"] = s.scalar(select(func.count()).where(JobAttempt.job_id.is_(None))) or 0
    return counts


def _job_column(table: Any) -> Any:
    return table.id if table is Job else table.job_id


class TestDelete:
    def test_a_finished_job_goes_with_every_row_and_file_but_its_attempts_stay(
        self, client: TestClient, clean_db: Settings
    ) -> None:
        job_id = client.post("/v1/jobs", json={"name": "to delete"}).json()["id"]
        _finish(clean_db, job_id)
        files = _stored_job(clean_db, job_id)
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/metrics").status_code == 404
        assert job_id not in [j["id"] for j in client.get("/v1/jobs").json()["items"]]
        assert [key for key in files if (clean_db.checkpoint_root / key).exists()] == []
        assert not (clean_db.checkpoint_root / job_id).exists()
        assert _rows(clean_db, job_id) == {
            "jobs": 0, "metric_points": 0, "checkpoints": 0, "samples": 0, "sample_requests": 0,
            "job_log_lines": 0, "job_events": 0, "job_attempts (job_id null)": 1,
        }  # fmt: skip
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 404  # gone: nothing is left to name it

    @pytest.mark.parametrize("status", ["queued", "running"])
    def test_a_queued_or_running_job_must_be_cancelled_first(
        self, client: TestClient, clean_db: Settings, status: str
    ) -> None:
        job_id = client.post("/v1/jobs", json={}).json()["id"]
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(status=status))
        r = client.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 409
        assert r.json()["detail"] == (
            f"job {job_id} is {status}: cancel it first (POST /v1/jobs/{job_id}/cancel), "
            "then delete it once it has ended"
        )
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == status

    def test_a_job_being_deleted_is_gone_and_deleting_it_again_is_a_204(
        self, client: TestClient, clean_db: Settings, alice: ApiUser
    ) -> None:
        job_id = client.post("/v1/jobs", json={}).json()["id"]
        _finish(clean_db, job_id, status="cancelled")
        factory = make_sessionmaker(make_engine(clean_db))
        with session_scope(factory) as s:  # marked, and the API died before removing anything
            lifecycle.mark_deleted(s, uuid.UUID(job_id), s.get(User, alice.user.id))  # type: ignore[arg-type]
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
        assert client.post(f"/v1/jobs/{job_id}/continue", json={"steps": 900}).status_code == 404
        assert client.get("/v1/jobs").json()["items"] == []
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert _rows(clean_db, job_id)["jobs"] == 0

    def test_unknown_and_other_users_jobs_are_404_and_an_admin_may_delete_any(
        self, client: TestClient, clean_db: Settings, make_user: MakeUser
    ) -> None:
        job_id = client.post("/v1/jobs", json={}).json()["id"]
        _finish(clean_db, job_id, status="failed", error="boom")
        app = client.app
        with TestClient(app, headers=make_user("bob").headers) as bob:
            assert bob.delete(f"/v1/jobs/{job_id}").json() == {"detail": f"job {job_id} not found"}
        unknown = uuid.uuid4()
        assert client.delete(f"/v1/jobs/{unknown}").json() == {"detail": f"job {unknown} not found"}
        with TestClient(app, headers=make_user("root", admin=True).headers) as admin:
            assert admin.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert _rows(clean_db, job_id)["jobs"] == 0


class TestContinue:
    def test_a_finished_job_is_queued_again_to_its_new_total_and_sent(
        self, client: TestClient, clean_db: Settings
    ) -> None:
        job = client.post("/v1/jobs", json={"training": {"steps": 50}}).json()
        job_id = job["id"]
        _finish(clean_db, job_id, status="failed", step=30, attempt=3, stops=1, error="boom", cancel_requested=True)
        broker = redis.Redis.from_url(clean_db.broker_url)
        broker.delete(job["queue"])
        r = client.post(f"/v1/jobs/{job_id}/continue", json={"steps": 120})
        assert r.status_code == 200, r.text
        continued = r.json()
        assert (continued["status"], continued["total_steps"], continued["spec"]["training"]["steps"]) == (
            "queued", 120, 120,
        )  # fmt: skip
        assert (continued["error"], continued["finished_at"], continued["cancel_requested"]) == (None, None, False)
        assert continued["step"] == 30 and continued["attempt"] == 3
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            assert s.get(Job, uuid.UUID(job_id)).stops == 3  # type: ignore[union-attr]
        deadline, sent = time.monotonic() + 10, []
        while not sent and time.monotonic() < deadline:  # the API sends on its background thread
            sent = [json.loads(m)["headers"]["argsrepr"] for m in broker.lrange(job["queue"], 0, -1)]
            time.sleep(0.02)
        assert sent == [repr([job_id])]

    def test_refusals_name_the_field(self, client: TestClient, clean_db: Settings) -> None:
        job_id = client.post("/v1/jobs", json={"training": {"steps": 50}}).json()["id"]
        url = f"/v1/jobs/{job_id}/continue"
        r = client.post(url, json={"steps": 100})
        assert r.status_code == 409 and "only a finished job" in r.json()["detail"]
        _finish(clean_db, job_id, step=50)

        def refused(body: Any) -> tuple[list[Any], str]:
            r = client.post(url, json=body)
            assert r.status_code == 422, r.text
            return r.json()["detail"][0]["loc"], r.json()["detail"][0]["msg"]

        assert refused({"steps": 50}) == (["body", "steps"], "must be more than the 50 steps the job has done, got 50")
        limit = clean_db.max_steps
        assert refused({"steps": limit + 1}) == (
            ["body", "steps"], f"at most {limit} on this service (DDPM_MAX_STEPS), got {limit + 1}",
        )  # fmt: skip
        assert refused(None)[0] == ["body", "steps"]
        assert refused({})[0] == ["body", "steps"]
        assert refused({"steps": "60"})[0] == ["body", "steps"]
        assert refused({"steps": True})[0] == ["body", "steps"]
        assert refused({"steps": 60, "other": 1})[0] == ["body", "other"]
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        unknown = uuid.uuid4()
        assert client.post(f"/v1/jobs/{unknown}/continue").json() == {"detail": f"job {unknown} not found"}

    def test_continuing_counts_against_the_queue_quota(self, clean_db: Settings, alice: ApiUser) -> None:
        app = create_app(clean_db.model_copy(update={"max_queued_jobs_per_user": 1}))
        with TestClient(app, headers=alice.headers) as c:
            first = c.post("/v1/jobs", json={}).json()["id"]
            _finish(clean_db, first)
            c.post("/v1/jobs", json={}).raise_for_status()
            r = c.post(f"/v1/jobs/{first}/continue", json={"steps": 600})
            assert r.status_code == 429 and "DDPM_MAX_QUEUED_JOBS_PER_USER=1" in r.json()["detail"]
