from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Checkpoint, JobEvent, MetricPoint
from tests.conftest import MakeUser


def _add_checkpoint(settings: Settings, job_id: str, step: int, payload: bytes) -> Path:
    job_dir = settings.checkpoint_root / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / f"step-{step:08d}.safetensors"
    path.write_bytes(payload)
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        s.add(
            Checkpoint(
                job_id=uuid.UUID(job_id),
                step=step,
                path=f"{job_id}/{path.name}",
                size_bytes=len(payload),
                sha256=hashlib.sha256(payload).hexdigest(),
                state_path=f"{job_id}/step-{step:08d}.state.safetensors",
            )
        )
    return path


@pytest.fixture
def job_id(client: TestClient) -> str:
    return client.post("/v1/jobs", json={}).json()["id"]


class TestCheckpoints:
    def test_list_in_step_order_with_sha256(self, client: TestClient, clean_db: Settings, job_id: str) -> None:
        _add_checkpoint(clean_db, job_id, 200, b"b" * 20)
        _add_checkpoint(clean_db, job_id, 100, b"a" * 10)
        listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
        assert [(c["step"], c["size_bytes"], c["sha256"]) for c in listed] == [
            (100, 10, hashlib.sha256(b"a" * 10).hexdigest()),
            (200, 20, hashlib.sha256(b"b" * 20).hexdigest()),
        ]

    def test_download_by_step_and_latest_carry_the_sha256(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        _add_checkpoint(clean_db, job_id, 100, b"old weights")
        _add_checkpoint(clean_db, job_id, 200, b"new weights")
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/100")
        assert r.status_code == 200
        assert r.content == b"old weights"
        latest = client.get(f"/v1/jobs/{job_id}/checkpoints/latest")
        sha = hashlib.sha256(b"new weights").hexdigest()
        assert latest.content == b"new weights"
        assert latest.headers["etag"] == f'"{sha}"'
        assert latest.headers["x-checksum-sha256"] == sha
        assert "step-00000200.safetensors" in latest.headers["content-disposition"]

    def test_range_requests_return_the_asked_bytes(self, client: TestClient, clean_db: Settings, job_id: str) -> None:
        payload = bytes(range(256)) * 8
        _add_checkpoint(clean_db, job_id, 10, payload)
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/10", headers={"Range": "bytes=100-199"})
        assert r.status_code == 206
        assert r.content == payload[100:200]
        assert r.headers["content-range"] == f"bytes 100-199/{len(payload)}"

    def test_damaged_or_missing_file_is_reported_not_served(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        path = _add_checkpoint(clean_db, job_id, 10, b"0123456789")
        path.write_bytes(b"0123456780")  # same size, different bytes
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/10")
        assert r.status_code == 410
        assert "sha256" in r.json()["detail"]
        path.unlink()
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/latest")
        assert r.status_code == 410
        assert "missing" in r.json()["detail"]

    def test_no_checkpoint_and_unknown_job_are_404(self, client: TestClient, job_id: str) -> None:
        assert client.get(f"/v1/jobs/{job_id}/checkpoints").json() == []
        assert client.get(f"/v1/jobs/{job_id}/checkpoints/latest").status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/checkpoints/5").status_code == 404
        assert client.get(f"/v1/jobs/{uuid.uuid4()}/checkpoints").status_code == 404
        assert client.get(f"/v1/jobs/{uuid.uuid4()}/checkpoints/latest").status_code == 404

    def test_latest_with_no_checkpoint_says_so_and_a_bad_step_is_one_422(self, client: TestClient, job_id: str) -> None:
        for path in ("latest", "latest/export"):
            r = client.get(f"/v1/jobs/{job_id}/checkpoints/{path}")
            assert (r.status_code, r.json()) == (404, {"detail": f"job {job_id} has no checkpoint yet"})
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/5/export")
        assert (r.status_code, r.json()) == (404, {"detail": f"job {job_id} has no checkpoint at step 5"})
        for bad in ("newest", "Latest", "-1", "1.5", "2147483648", "٣"):
            for path in (bad, f"{bad}/export"):
                r = client.get(f"/v1/jobs/{job_id}/checkpoints/{path}")
                assert r.status_code == 422, (path, r.text)
                assert [e["loc"] for e in r.json()["detail"]] == [["path", "step"]], (path, r.text)

    def test_a_row_pointing_outside_the_root_is_refused(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            s.add(
                Checkpoint(
                    job_id=uuid.UUID(job_id),
                    step=1,
                    path="../../etc/passwd",
                    size_bytes=1,
                    sha256="0" * 64,
                    state_path="x",
                )
            )
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/1")
        assert r.status_code == 410
        assert "root" in r.json()["detail"]


class TestMetrics:
    def test_pages_in_step_order(self, client: TestClient, clean_db: Settings, job_id: str) -> None:
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            for step in (30, 10, 20, 40, 50):
                s.add(MetricPoint(job_id=uuid.UUID(job_id), step=step, loss=1.0 / step, lr=1e-4, images_per_s=99.0))
        first = client.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 2}).json()
        assert [p["step"] for p in first["items"]] == [10, 20]
        assert first["items"][0]["loss"] == pytest.approx(0.1)
        assert first["next_after_step"] == 20
        rest = client.get(f"/v1/jobs/{job_id}/metrics", params={"after_step": 20, "limit": 3}).json()
        assert [p["step"] for p in rest["items"]] == [30, 40, 50]
        assert rest["next_after_step"] is None

    def test_a_point_carries_its_loss_by_t(self, client: TestClient, clean_db: Settings, job_id: str) -> None:
        by_t = [0.5, None, 0.25, None, None, None, None, None, None, 0.125]
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            s.add(MetricPoint(job_id=uuid.UUID(job_id), step=10, loss=0.3, lr=1e-4, images_per_s=9.0, loss_by_t=by_t))
            s.add(MetricPoint(job_id=uuid.UUID(job_id), step=20, loss=0.3, lr=1e-4, images_per_s=9.0))
        items = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
        assert [p["loss_by_t"] for p in items] == [by_t, None]

    def test_a_point_carries_its_mfu_and_peak_memory(self, client: TestClient, clean_db: Settings, job_id: str) -> None:
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            s.add(MetricPoint(job_id=uuid.UUID(job_id), step=10, loss=0.3, lr=1e-4, images_per_s=9.0,
                              mfu=0.42, peak_memory_bytes=3 * 2**33))  # fmt: skip
            s.add(MetricPoint(job_id=uuid.UUID(job_id), step=20, loss=0.3, lr=1e-4, images_per_s=9.0))
        items = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
        assert [(p["mfu"], p["peak_memory_bytes"]) for p in items] == [(0.42, 3 * 2**33), (None, None)]

    def test_unknown_job_is_404(self, client: TestClient) -> None:
        assert client.get(f"/v1/jobs/{uuid.uuid4()}/metrics").status_code == 404


class TestTrainingEvents:
    def test_pages_oldest_first_and_bad_cursors_are_422(
        self, client: TestClient, clean_db: Settings, job_id: str
    ) -> None:
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            detail = {"micro_batch": 32, "was": 64, "batch": 128}
            for attempt, step in [(1, 7), (1, 7), (2, 3)]:  # a resumed attempt re-does earlier steps
                s.add(JobEvent(job_id=uuid.UUID(job_id), attempt=attempt, step=step, kind="oom_halved",
                               message=f"halved at {step}", detail=detail))  # fmt: skip
                s.flush()
        first = client.get(f"/v1/jobs/{job_id}/training-events", params={"limit": 2}).json()
        assert [(e["attempt"], e["step"]) for e in first["items"]] == [(1, 7), (1, 7)]
        assert first["items"][0]["detail"] == {"micro_batch": 32, "was": 64, "batch": 128}
        assert first["next_after_id"] == first["items"][1]["id"]
        rest = client.get(f"/v1/jobs/{job_id}/training-events", params={"after_id": first["next_after_id"]}).json()
        assert [(e["attempt"], e["step"], e["message"]) for e in rest["items"]] == [(2, 3, "halved at 3")]
        assert rest["next_after_id"] is None
        for crafted in ("-1", "x", str(2**63), "1.5"):
            r = client.get(f"/v1/jobs/{job_id}/training-events", params={"after_id": crafted})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "after_id"]

    def test_an_unknown_or_another_users_job_is_404(
        self, client: TestClient, clean_db: Settings, job_id: str, make_user: MakeUser
    ) -> None:
        assert client.get(f"/v1/jobs/{uuid.uuid4()}/training-events").status_code == 404
        with TestClient(create_app(clean_db), headers=make_user("bob").headers) as bob:
            assert bob.get(f"/v1/jobs/{job_id}/training-events").status_code == 404


class TestLossPlot:
    def test_a_png_of_the_loss_curve(self, client: TestClient, clean_db: Settings, job_id: str, tmp_path: Path) -> None:
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            for step in range(10, 210, 10):
                s.add(MetricPoint(job_id=uuid.UUID(job_id), step=step, loss=1.0 / step, lr=1e-4, images_per_s=9.0))
        r = client.get(f"/v1/jobs/{job_id}/loss.png")
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png"
        from PIL import Image

        (tmp_path / "loss.png").write_bytes(r.content)
        with Image.open(tmp_path / "loss.png") as image:
            assert image.size == (700, 400)
            # Something was drawn in the plot's blue, not just axes.
            assert (37, 99, 235) in {color for _, color in image.convert("RGB").getcolors(maxcolors=1 << 16)}
        assert client.get(f"/v1/jobs/{job_id}/loss.png", params={"log": "false"}).status_code == 200
        assert client.get(f"/v1/jobs/{uuid.uuid4()}/loss.png").status_code == 404

    def test_an_empty_history_still_draws(self, client: TestClient, job_id: str) -> None:
        r = client.get(f"/v1/jobs/{job_id}/loss.png")
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
