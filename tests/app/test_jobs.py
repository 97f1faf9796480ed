from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Job, JobStatus
from app.spec import JobSpec
from tests.conftest import ApiUser


def _set_status(settings: Settings, job_id: str, status: JobStatus) -> None:
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(status=status))


class TestCreate:
    def test_empty_spec_is_queued_with_every_default_resolved(self, client: TestClient) -> None:
        r = client.post("/v1/jobs", json={})
        assert r.status_code == 201, r.text
        job = r.json()
        uuid.UUID(job["id"])
        assert job["status"] == "queued"
        assert job["spec"] == JobSpec().model_dump(mode="json")
        assert job["spec"]["model"]["channels"] == [32, 64]
        assert job["total_steps"] == 500
        assert job["step"] == 0
        assert job["created_at"].endswith(("Z", "+00:00"))
        assert job["started_at"] is None and job["finished_at"] is None

    def test_the_task_is_sent_by_name_with_the_job_id_only(self, client: TestClient, clean_db: Settings) -> None:
        job = client.post("/v1/jobs", json={"name": "sent"}).json()
        job_id = job["id"]
        # The tiny model on one GPU: the queue of one-GPU jobs that need at most 1 GiB.
        assert job["queue"] == f"{clean_db.queue}.gpus-1.mem-1"
        broker, deadline = redis.Redis.from_url(clean_db.broker_url), time.monotonic() + 10
        mine: list[dict] = []
        while not mine and time.monotonic() < deadline:  # the API sends on its background thread
            headers = [json.loads(m)["headers"] for m in broker.lrange(job["queue"], 0, -1)]
            mine = [h for h in headers if h["argsrepr"] == repr([job_id])]
            time.sleep(0.02)
        assert len(mine) == 1
        assert mine[0]["task"] == "jobs.train"

    def test_preset_fields_can_be_overridden(self, client: TestClient) -> None:
        r = client.post(
            "/v1/jobs", json={"model": {"preset": "ddpm-cifar10", "dropout": 0.0}, "dataset": {"image_size": 32}}
        )
        assert r.status_code == 201, r.text
        model = r.json()["spec"]["model"]
        assert model == {
            "preset": "ddpm-cifar10",
            "channels": [128, 256, 256, 256],
            "layers_per_block": 2,
            "attention_resolutions": [16],
            "dropout": 0.0,
            "norm_groups": 32,
        }

    def test_broker_down_still_stores_the_job_for_the_sweeper(self, clean_db: Settings, alice: ApiUser) -> None:
        down = clean_db.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
        with TestClient(create_app(down), headers=alice.headers) as c:
            r = c.post("/v1/jobs", json={})
        assert r.status_code == 201
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            job = s.scalars(select(Job).where(Job.id == uuid.UUID(r.json()["id"]))).one()
            assert job.status == JobStatus.queued
            assert job.dispatched_at is None


class TestValidation:
    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"training": {"steps": 0}}, "steps"),
            ({"training": {"batch_size": 0}}, "batch_size"),
            ({"training": {"steps": "100"}}, "steps"),
            ({"training": {"learning_rate": -1}}, "learning_rate"),
            ({"diffusion": {"timesteps": 1}}, "timesteps"),
            ({"diffusion": {"beta_start": 0.02, "beta_end": 0.01}}, "beta_end"),
            ({"diffusion": {"beta_schedule": "quadratic"}}, "beta_schedule"),
            ({"diffusion": {"prediction": "noise"}}, "prediction"),
            ({"dataset": {"kind": "url"}}, "kind"),
            ({"dataset": {"kind": "folder"}}, "path"),
            ({"dataset": {"image_size": 18}, "model": {"preset": "ddpm-cifar10"}}, "image_size"),
            ({"model": {"channels": [30, 64]}}, "channels"),
            ({"model": {"attention_resolutions": [32]}}, "attention_resolutions"),
            ({"trainig": {}}, "trainig"),
            ({"training": {"stepz": 5}}, "stepz"),
        ],
    )
    def test_refused_with_422_naming_the_field(self, client: TestClient, body: dict, field: str) -> None:
        r = client.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        errors = r.json()["detail"]
        assert any(field in map(str, e["loc"]) or field in e["msg"] for e in errors), errors
        assert client.get("/v1/jobs").json()["items"] == []

    @pytest.mark.parametrize("raw", ['{"training": {"learning_rate": NaN}}', '{"training": {"grad_clip": Infinity}}'])
    def test_non_finite_numbers_are_refused(self, client: TestClient, raw: str) -> None:
        r = client.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"][-1] in {"learning_rate", "grad_clip"}

    def test_malformed_json_is_422(self, client: TestClient) -> None:
        r = client.post("/v1/jobs", content="{", headers={"content-type": "application/json"})
        assert r.status_code == 422


class TestRead:
    def test_get_returns_the_job(self, client: TestClient) -> None:
        created = client.post("/v1/jobs", json={"name": "one"}).json()
        got = client.get(f"/v1/jobs/{created['id']}")
        assert got.status_code == 200
        assert got.json() == created

    def test_unknown_job_is_404_and_bad_id_is_422(self, client: TestClient) -> None:
        assert client.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
        assert client.get("/v1/jobs/123").status_code == 422

    def test_list_pages_newest_first_without_overlap(self, client: TestClient) -> None:
        ids = [client.post("/v1/jobs", json={"name": f"j{i}"}).json()["id"] for i in range(5)]
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = client.get("/v1/jobs", params=params).json()
            seen += [j["id"] for j in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3
        assert seen == list(reversed(ids))

    def test_status_filter(self, client: TestClient, clean_db: Settings) -> None:
        a = client.post("/v1/jobs", json={}).json()["id"]
        b = client.post("/v1/jobs", json={}).json()["id"]
        _set_status(clean_db, b, JobStatus.running)
        assert [j["id"] for j in client.get("/v1/jobs", params={"status": "queued"}).json()["items"]] == [a]
        assert [j["id"] for j in client.get("/v1/jobs", params={"status": "running"}).json()["items"]] == [b]
        assert client.get("/v1/jobs", params={"status": "done"}).status_code == 422

    def test_bad_cursor_and_limit_are_422(self, client: TestClient) -> None:
        r = client.get("/v1/jobs", params={"cursor": "not-a-cursor"})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["query", "cursor"]
        assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422
        assert client.get("/v1/jobs", params={"limit": 501}).status_code == 422


class TestCancel:
    def test_queued_job_is_cancelled_at_once_and_cancel_is_idempotent(self, client: TestClient) -> None:
        job_id = client.post("/v1/jobs", json={}).json()["id"]
        first = client.post(f"/v1/jobs/{job_id}/cancel")
        assert first.status_code == 200
        assert first.json()["status"] == "cancelled"
        assert first.json()["finished_at"] is not None
        again = client.post(f"/v1/jobs/{job_id}/cancel")
        assert again.status_code == 200
        assert again.json() == first.json()

    def test_running_job_gets_a_cancel_request(self, client: TestClient, clean_db: Settings) -> None:
        job_id = client.post("/v1/jobs", json={}).json()["id"]
        _set_status(clean_db, job_id, JobStatus.running)
        r = client.post(f"/v1/jobs/{job_id}/cancel").json()
        assert (r["status"], r["cancel_requested"]) == ("running", True)

    @pytest.mark.parametrize("final", [JobStatus.succeeded, JobStatus.failed])
    def test_finished_job_cannot_be_cancelled(self, client: TestClient, clean_db: Settings, final: JobStatus) -> None:
        job_id = client.post("/v1/jobs", json={}).json()["id"]
        _set_status(clean_db, job_id, final)
        r = client.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 409
        assert final.value in r.json()["detail"]
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == final.value

    def test_unknown_job_is_404(self, client: TestClient) -> None:
        assert client.post(f"/v1/jobs/{uuid.uuid4()}/cancel").status_code == 404


class TestDependencies:
    def test_healthz_and_readyz(self, client: TestClient) -> None:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ok"}

    def test_database_down_is_503_not_500(self, clean_db: Settings, alice: ApiUser) -> None:
        down = clean_db.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/nope"})
        with TestClient(create_app(down), raise_server_exceptions=False, headers=alice.headers) as c:
            listed, posted = c.get("/v1/jobs"), c.post("/v1/jobs", json={})
            assert (listed.status_code, posted.status_code) == (503, 503)
            assert listed.headers["Retry-After"] == posted.headers["Retry-After"] == "2"
            ready = c.get("/readyz")
        assert ready.status_code == 503
        assert set(ready.json()["detail"]) == {"database"}

    def test_broker_down_makes_readyz_503(self, clean_db: Settings) -> None:
        down = clean_db.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
        with TestClient(create_app(down)) as c:
            ready = c.get("/readyz")
        assert ready.status_code == 503
        assert set(ready.json()["detail"]) == {"broker"}


def test_the_api_never_imports_torch() -> None:
    code = (
        "import sys, app.main, app.cli; app.main.create_app(); "
        "bad = sorted(m for m in ('torch', 'diffusers', 'worker') if m in sys.modules); print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd="/tmp",
        env={"DDPM_DATA_DIR": "/tmp/ddpm-import-check", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == "[]"


class TestIdempotentSubmit:
    def test_a_repeat_returns_the_same_job_with_200(self, client: TestClient) -> None:
        headers = {"Idempotency-Key": "abc-1"}
        first = client.post("/v1/jobs", json={"name": "x"}, headers=headers)
        again = client.post("/v1/jobs", json={"name": "x"}, headers=headers)
        assert (first.status_code, again.status_code) == (201, 200)
        assert again.json() == first.json()
        assert len(client.get("/v1/jobs").json()["items"]) == 1

    def test_the_same_key_with_another_body_is_409(self, client: TestClient) -> None:
        client.post("/v1/jobs", json={"name": "x"}, headers={"Idempotency-Key": "abc-2"})
        r = client.post("/v1/jobs", json={"name": "y"}, headers={"Idempotency-Key": "abc-2"})
        assert r.status_code == 409
        assert "abc-2" in r.json()["detail"]

    def test_concurrent_repeats_create_one_job_per_key(self, client: TestClient) -> None:
        from concurrent.futures import ThreadPoolExecutor

        def submit(i: int) -> tuple[int, str]:
            r = client.post("/v1/jobs", json={"name": f"k{i % 5}"}, headers={"Idempotency-Key": f"key-{i % 5}"})
            return r.status_code, r.json()["id"]

        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(submit, range(40)))
        assert {code for code, _ in results} <= {200, 201}
        assert sum(code == 201 for code, _ in results) == 5
        assert len({job for _, job in results}) == 5
        assert len(client.get("/v1/jobs").json()["items"]) == 5
