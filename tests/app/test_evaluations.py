"""GET /v1/jobs/{id}/evaluations, the `evaluation` event, and the `best` checkpoint (downloads,
export, sample requests)."""

from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.evaluations.repository import EvaluationRepository
from tests.app.test_checkpoints_and_metrics import _add_checkpoint
from tests.app.test_events import Rows, keyed, parse_sse
from tests.conftest import EVALUATION_FIGURES, MakeUser, evaluation_row

FIGURES = EVALUATION_FIGURES  # what evaluation_row fills in besides the step and the FID


def add_evaluation(settings: Settings, job_id: str, step: int, fid: float) -> None:
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        EvaluationRepository(s).add(evaluation_row(job_id, step, fid))


@pytest.fixture
def job_id(client: TestClient) -> str:
    return client.post("/v1/jobs", json={}).json()["id"]


class TestList:
    def test_pages_in_step_order(self, client: TestClient, clean_db: Settings, job_id: str) -> None:
        for step, fid in [(300, 30.0), (100, 50.0), (200, 40.0)]:
            add_evaluation(clean_db, job_id, step, fid)
        first = client.get(f"/v1/jobs/{job_id}/evaluations", params={"limit": 2}).json()
        assert [e["step"] for e in first] == [100, 200]
        created_at = first[0].pop("created_at")
        assert first[0] == {"step": 100, "fid": 50.0} | FIGURES
        assert created_at.endswith(("Z", "+00:00"))
        rest = client.get(f"/v1/jobs/{job_id}/evaluations", params={"after_step": 200}).json()
        assert [(e["step"], e["fid"]) for e in rest] == [(300, 30.0)]

    def test_a_non_finite_fid_is_null(self, client: TestClient, clean_db: Settings, job_id: str) -> None:
        add_evaluation(clean_db, job_id, 100, math.nan)
        assert client.get(f"/v1/jobs/{job_id}/evaluations").json()[0]["fid"] is None

    def test_another_users_job_is_404_and_a_bad_limit_422(
        self, client: TestClient, clean_db: Settings, job_id: str, make_user: MakeUser
    ) -> None:
        add_evaluation(clean_db, job_id, 100, 50.0)
        r = client.get(f"/v1/jobs/{job_id}/evaluations", headers=make_user("bob").headers)
        assert (r.status_code, r.json()) == (404, {"detail": f"job {job_id} not found"})  # as for no job at all
        r = client.get(f"/v1/jobs/{job_id}/evaluations", params={"limit": 0})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "limit"]


class TestEvents:
    def test_the_evaluation_follows_the_sample_of_its_step_and_replays_after_last_event_id(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        rows = Rows(clean_db, job_id)
        for step in (10, 20, 30):
            rows.metric(step)
        rows.checkpoint(20)
        rows.sample(20)
        add_evaluation(clean_db, job_id, 20, 12.5)
        rows.status("succeeded", step=30)
        events = parse_sse(client.get(f"/v1/jobs/{job_id}/events").text)
        assert keyed(events)[4:7] == [("sample", "20.2"), ("evaluation", "20.3"), ("metric", "30.0")]
        assert events[5]["data"] == {"step": 20, "fid": 12.5} | FIGURES
        for last, replayed in [("20.2", ["20.3", "30.0"]), ("20.3", ["30.0"])]:
            r = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last})
            assert [i for _, i in keyed(parse_sse(r.text)) if i] == replayed
        assert client.get(f"/v1/jobs/{job_id}/events", params={"after": "20.4"}).status_code == 422


class TestBest:
    def test_best_is_404_until_a_checkpoint_is_evaluated(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        _add_checkpoint(clean_db, job_id, 100, b"weights 100")
        add_evaluation(clean_db, job_id, 50, 1.0)  # no checkpoint at 50
        for path in ("checkpoints/best", "checkpoints/best/export"):
            r = client.get(f"/v1/jobs/{job_id}/{path}")
            assert (r.status_code, r.json()) == (404, {"detail": f"job {job_id} has no evaluated checkpoint"})
        r = client.post(f"/v1/jobs/{job_id}/sample", json={"checkpoint_step": "best"})
        assert (r.status_code, r.json()) == (404, {"detail": f"job {job_id} has no evaluated checkpoint"})

    def test_best_is_the_lowest_fid_ties_the_earliest(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        for step, fid in [(100, 30.0), (200, 10.0), (300, 10.0), (400, math.nan)]:
            _add_checkpoint(clean_db, job_id, step, f"weights {step}".encode())
            add_evaluation(clean_db, job_id, step, fid)
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/best")
        assert r.status_code == 200 and r.content == b"weights 200"
        assert "step-00000200.safetensors" in r.headers["content-disposition"]
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/best/export")
        assert r.status_code == 410  # found (these are no real weights)

    def test_a_sample_request_draws_from_the_best_or_the_latest(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        for step, fid in [(100, 10.0), (200, 20.0)]:
            _add_checkpoint(clean_db, job_id, step, f"weights {step}".encode())
            add_evaluation(clean_db, job_id, step, fid)
        for named, step in [("best", 100), ("latest", 200), (100, 100)]:
            r = client.post(f"/v1/jobs/{job_id}/sample", json={"checkpoint_step": named})
            assert (r.status_code, r.json()["checkpoint_step"]) == (202, step), r.text
        for bad in ("newest", 1.5, -1, True):
            r = client.post(f"/v1/jobs/{job_id}/sample", json={"checkpoint_step": bad})
            assert r.status_code == 422, (bad, r.text)
            assert [e["loc"] for e in r.json()["detail"]] == [["body", "checkpoint_step"]], (bad, r.text)
