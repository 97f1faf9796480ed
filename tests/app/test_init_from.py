"""A fine-tune's source checked at submit (app/jobs/init_from.py): each refusal a 422 whose loc
names the field, the resolved step stored in the spec. Checkpoint rows are written directly: the
API never opens the files."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.models import Checkpoint, Job, utcnow
from tests.conftest import ApiUser, MakeUser, evaluation_row

LOC = ["body", "training", "init_from"]


def add_checkpoints(settings: Settings, job_id: str, *steps: int, fids: dict[int, float] | None = None) -> None:
    with session_scope(make_sessionmaker(make_engine(settings))) as s:
        for step in steps:
            key = f"{job_id}/attempt-1/step-{step:08d}"
            s.add(
                Checkpoint(
                    job_id=uuid.UUID(job_id),
                    step=step,
                    path=f"{key}.safetensors",
                    size_bytes=1,
                    sha256="0" * 64,
                    state_path=f"{key}.state.safetensors",
                )
            )
        s.flush()
        for step, fid in (fids or {}).items():
            s.add(evaluation_row(job_id, step, fid))


def fine_tune(init_from: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return spec | {"training": spec.get("training", {}) | {"init_from": init_from}}


def refusal(r: Any) -> list[tuple[list[Any], str]]:
    assert r.status_code == 422, r.text
    return [(e["loc"], e["msg"]) for e in r.json()["detail"]]


@pytest.fixture
def source(client: TestClient, clean_db: Settings) -> str:
    """Alice's job (the tiny preset at 8x8) with checkpoints at 100, 200, 300; 200 has the best FID."""
    job_id = client.post("/v1/jobs", json={}).json()["id"]
    add_checkpoints(clean_db, job_id, 100, 200, 300, fids={200: 12.5, 300: 20.0})
    return job_id


class TestAccepted:
    @pytest.mark.parametrize(("checkpoint", "step"), [("latest", 300), ("best", 200), (100, 100)])
    def test_the_checkpoint_resolves_to_its_step(self, client: TestClient, source: str, checkpoint, step) -> None:
        r = client.post("/v1/jobs", json=fine_tune({"job": source.upper(), "checkpoint": checkpoint}))
        assert r.status_code == 201, r.text
        stored = r.json()["spec"]["training"]["init_from"]
        assert stored == {"job": source, "checkpoint": checkpoint, "step": step}
        assert client.get(f"/v1/jobs/{r.json()['id']}").json()["spec"]["training"]["init_from"] == stored

    def test_a_step_sent_by_the_client_is_replaced(self, client: TestClient, source: str) -> None:
        r = client.post("/v1/jobs", json=fine_tune({"job": source, "step": 100}))
        assert r.status_code == 201, r.text
        assert r.json()["spec"]["training"]["init_from"]["step"] == 300

    def test_what_does_not_change_the_parameters_may_differ(self, client: TestClient, source: str) -> None:
        # Another image size (no attention anywhere), dropout, schedule, prediction, training.
        body = fine_tune(
            {"job": source},
            dataset={"image_size": 16},
            model={"dropout": 0.1},
            diffusion={"prediction": "eps", "beta_schedule": "cosine", "timesteps": 500},
            training={"learning_rate": 1e-5, "seed": 7},
        )
        assert client.post("/v1/jobs", json=body).status_code == 201


class TestRefused:
    def test_an_unknown_job(self, client: TestClient) -> None:
        missing = str(uuid.uuid4())
        assert refusal(client.post("/v1/jobs", json=fine_tune({"job": missing}))) == [
            ([*LOC, "job"], f"job {missing} not found: use the id of one of your jobs (GET /v1/jobs)")
        ]

    def test_another_users_job_reads_as_a_missing_one_for_an_admin_too(
        self, client: TestClient, clean_db: Settings, make_user: MakeUser, source: str
    ) -> None:
        for other in (make_user("bob"), make_user("root", admin=True)):
            r = client.post("/v1/jobs", json=fine_tune({"job": source}), headers=other.headers)
            assert refusal(r) == [
                ([*LOC, "job"], f"job {source} not found: use the id of one of your jobs (GET /v1/jobs)")
            ]

    def test_a_deleted_job_reads_as_a_missing_one(self, client: TestClient, clean_db: Settings, source: str) -> None:
        with session_scope(make_sessionmaker(make_engine(clean_db))) as s:
            s.execute(update(Job).where(Job.id == uuid.UUID(source)).values(deleted_at=utcnow()))
        assert refusal(client.post("/v1/jobs", json=fine_tune({"job": source}))) == [
            ([*LOC, "job"], f"job {source} not found: use the id of one of your jobs (GET /v1/jobs)")
        ]

    def test_a_job_without_checkpoints(self, client: TestClient) -> None:
        empty = client.post("/v1/jobs", json={}).json()["id"]
        assert refusal(client.post("/v1/jobs", json=fine_tune({"job": empty}))) == [
            (
                [*LOC, "checkpoint"],
                f"job {empty} has no checkpoint yet: wait until it saves one (training.checkpoint_every)",
            )
        ]

    def test_a_step_it_has_no_checkpoint_at(self, client: TestClient, source: str) -> None:
        assert refusal(client.post("/v1/jobs", json=fine_tune({"job": source, "checkpoint": 150}))) == [
            (
                [*LOC, "checkpoint"],
                f"job {source} has no checkpoint at step 150; its checkpoints are at steps 100, 200, 300",
            )
        ]

    def test_best_without_an_evaluated_checkpoint(self, client: TestClient, clean_db: Settings) -> None:
        job_id = client.post("/v1/jobs", json={}).json()["id"]
        add_checkpoints(clean_db, job_id, 50)
        [(loc, msg)] = refusal(client.post("/v1/jobs", json=fine_tune({"job": job_id, "checkpoint": "best"})))
        assert loc == [*LOC, "checkpoint"]
        assert msg.startswith(f"job {job_id} has no evaluated checkpoint (`best` needs a kept checkpoint with an FID")

    @pytest.mark.parametrize(
        ("change", "says"),
        [
            ({"model": {"channels": [64, 128]}}, "model.channels is [32, 64] there, [64, 128] here"),
            ({"model": {"layers_per_block": 2}}, "model.layers_per_block is 1 there, 2 here"),
            ({"model": {"norm_groups": 16}}, "model.norm_groups is 8 there, 16 here"),
            ({"dataset": {"channels": 3}}, "dataset.channels is 1 there, 3 here"),
            (
                {"model": {"attention_resolutions": [4]}},
                "self-attention is on levels [] there (model.attention_resolutions [] at dataset.image_size 8), "
                "on levels [1] here ([4] at 8)",
            ),
        ],
    )
    def test_a_model_the_weights_do_not_fit(self, client: TestClient, source: str, change: dict, says: str) -> None:
        [(loc, msg)] = refusal(client.post("/v1/jobs", json=fine_tune({"job": source}, **change)))
        assert loc == LOC
        assert msg == (
            f"job {source}'s weights do not fit this model: {says}. Use the same model and dataset.channels as "
            "that job (dataset.image_size may differ if the same levels have attention)"
        )

    def test_the_same_attention_resolution_at_another_image_size_moves_the_attention(
        self, client: TestClient, clean_db: Settings
    ) -> None:
        job_id = client.post("/v1/jobs", json={"model": {"attention_resolutions": [8]}}).json()["id"]
        add_checkpoints(clean_db, job_id, 10)
        body = fine_tune({"job": job_id}, model={"attention_resolutions": [8]}, dataset={"image_size": 16})
        [(loc, msg)] = refusal(client.post("/v1/jobs", json=body))
        assert loc == LOC and "self-attention is on levels [0] there" in msg and "on levels [1] here" in msg

    def test_a_missing_checkpoint_and_a_misfit_are_both_named(self, client: TestClient, source: str) -> None:
        body = fine_tune({"job": source, "checkpoint": 7}, model={"channels": [16, 32]})
        assert [loc for loc, _ in refusal(client.post("/v1/jobs", json=body))] == [[*LOC, "checkpoint"], LOC]

    @pytest.mark.parametrize(
        ("init_from", "loc"),
        [
            ({"job": "not-a-uuid"}, [*LOC, "job"]),
            ({}, [*LOC, "job"]),
            ({"job": str(uuid.UUID(int=1)), "checkpoint": "newest"}, [*LOC, "checkpoint"]),
            ({"job": str(uuid.UUID(int=1)), "checkpoint": -1}, LOC),
            ({"job": str(uuid.UUID(int=1)), "extra": 1}, [*LOC, "extra"]),
        ],
    )
    def test_malformed(self, client: TestClient, init_from: dict, loc: list) -> None:
        r = client.post("/v1/jobs", json=fine_tune(init_from))
        assert r.status_code == 422, r.text
        assert any(e["loc"][: len(loc)] == loc for e in r.json()["detail"]), r.json()


def test_nothing_is_stored_for_a_refused_fine_tune(client: TestClient, alice: ApiUser) -> None:
    client.post("/v1/jobs", json=fine_tune({"job": str(uuid.uuid4())}))
    assert client.get("/v1/jobs").json()["items"] == []
