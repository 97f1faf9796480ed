"""Routing jobs to the workers that can hold them: queue names, what a worker consumes, the spec's
`resources.gpus` limits, and why a queued job waits (from the workers table)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.main import create_app
from app.models import Worker, utcnow
from app.routing import (
    Resources,
    can_hold,
    job_resources,
    memory_class,
    queue_name,
    sample_queue,
    train_queue,
    worker_queues,
)
from app.spec import JobSpec
from app.spec_size import training_memory_bytes
from tests.conftest import MakeUser
from worker.sweeper import check_in, check_out


@pytest.mark.parametrize(
    ("gib", "expected"), [(0.01, 1), (1.0, 1), (1.2, 2), (3.9, 4), (4.0, 4), (4.1, 8), (79.2, 80), (80.1, 84)]
)
def test_memory_classes_are_whole_gib_up_to_4_then_multiples_of_4(gib: float, expected: int) -> None:
    assert memory_class(gib) == expected


def test_a_worker_consumes_exactly_the_queues_of_the_jobs_it_can_hold() -> None:
    worker = Resources(gpus=2, memory_gib=8)
    consumed = set(worker_queues("q", worker))
    assert len(consumed) == 2 * 5  # 2 GPU counts x classes 1, 2, 3, 4, 8
    for gpus in range(1, 5):
        for gib in (0.5, 1.5, 3.5, 4.5, 7.9, 8.0, 8.5, 20.0):
            needs = Resources(gpus, gib)
            assert (queue_name("q", needs) in consumed) == can_hold(worker, needs), needs
    assert worker_queues("q", worker)[0] == "q.gpus-2.mem-8"  # the largest jobs first
    # Sample requests have a queue of their own, which is no training queue.
    assert sample_queue("q") == "q.samples" and sample_queue("q") not in worker_queues("q", Resources(64, 1024))


def test_a_job_needs_its_share_of_the_batch_on_each_gpu() -> None:
    one = JobSpec.model_validate({"training": {"batch_size": 64}})
    four = JobSpec.model_validate({"training": {"batch_size": 64}, "resources": {"gpus": 4}})
    quarter = JobSpec.model_validate({"training": {"batch_size": 16}})
    assert training_memory_bytes(four) == training_memory_bytes(quarter) < training_memory_bytes(one)
    assert job_resources(four) == Resources(4, memory_class(training_memory_bytes(four) / 2**30))
    assert train_queue("ddpm", four) == "ddpm.gpus-4.mem-1"


def test_a_batch_too_big_for_a_gpu_class_routes_to_it_in_micro_batches_that_fit() -> None:
    """The GPU holds one micro-batch's activations at a time: 256 images do not fit 8 GiB, 256 in
    micro-batches of 32 do, and go to the 8 GiB class (whose workers consume it)."""
    shape = {"dataset": {"image_size": 32}, "model": {"preset": "ddpm-cifar10"}}
    whole = JobSpec.model_validate(shape | {"training": {"batch_size": 256}})
    split = JobSpec.model_validate(shape | {"training": {"batch_size": 256, "micro_batch": 32}})
    one_micro_batch = JobSpec.model_validate(shape | {"training": {"batch_size": 32}})
    assert training_memory_bytes(split) == training_memory_bytes(one_micro_batch)
    eight = Resources(gpus=1, memory_gib=8)
    assert not can_hold(eight, job_resources(whole))
    assert can_hold(eight, job_resources(split))
    assert train_queue("q", split) in worker_queues("q", eight)
    assert train_queue("q", whole) not in worker_queues("q", eight)


class TestSpec:
    def test_the_batch_must_split_evenly(self) -> None:
        with pytest.raises(ValueError, match=r"training.batch_size \(10\) must be divisible by resources.gpus \(4\)"):
            JobSpec.model_validate({"training": {"batch_size": 10}, "resources": {"gpus": 4}})

    def test_api_refuses_more_gpus_than_the_service_allows(self, client: TestClient) -> None:
        r = client.post("/v1/jobs", json={"training": {"batch_size": 64}, "resources": {"gpus": 16}})
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", "resources", "gpus"] and "DDPM_MAX_GPUS_PER_JOB" in error["msg"]

    def test_api_refuses_an_uneven_split_naming_the_fields(self, client: TestClient) -> None:
        r = client.post("/v1/jobs", json={"training": {"batch_size": 10}, "resources": {"gpus": 4}})
        assert r.status_code == 422
        assert "must be divisible by resources.gpus" in r.text


@pytest.fixture
def client(clean_db: Settings, make_user: MakeUser) -> TestClient:
    with TestClient(create_app(clean_db), headers=make_user().headers) as c:
        yield c


class TestWaitingReason:
    def test_no_worker_then_too_small_a_worker_then_one_that_fits(self, client: TestClient, clean_db: Settings) -> None:
        factory = make_sessionmaker(make_engine(clean_db))
        job = client.post("/v1/jobs", json={"training": {"batch_size": 8}, "resources": {"gpus": 2}}).json()
        assert job["queue"] == f"{clean_db.queue}.gpus-2.mem-1"
        assert job["waiting_reason"].startswith("no worker is running")

        # A samples-only worker is alive (for the requests it draws) but trains nothing.
        check_in(factory, "host-s:9", clean_db, Resources(8, 80), "cuda", sweep=False)
        assert client.get(f"/v1/jobs/{job['id']}").json()["waiting_reason"].startswith("no worker is running")
        # (tests/worker/test_sample_requests.py: the requests it draws are not orphaned.)

        check_in(factory, "host-a:1", clean_db, Resources(1, 16), "cuda")
        reason = client.get(f"/v1/jobs/{job['id']}").json()["waiting_reason"]
        assert reason.startswith("no running worker can hold this job: it needs 2 GPUs with 1 GiB each")
        assert "the largest of 1 running worker offers 1 GPU with 16 GiB each" in reason

        check_in(factory, "host-b:2", clean_db, Resources(2, 8), "cuda")
        listed = client.get("/v1/jobs").json()["items"]
        assert [j["waiting_reason"] for j in listed] == ["waiting for one of 1 running worker that can hold it"]

        # A worker that stopped checking in no longer counts; one that shut down removed its row.
        with session_scope(factory) as s:
            s.get(Worker, "host-b:2").seen_at = utcnow() - timedelta(seconds=clean_db.lease_timeout_s + 1)
        assert client.get(f"/v1/jobs/{job['id']}").json()["waiting_reason"].startswith("no running worker can hold")
        check_out(factory, "host-a:1")
        assert client.get(f"/v1/jobs/{job['id']}").json()["waiting_reason"].startswith("no worker is running")

    def test_jobs_that_are_not_queued_have_no_reason(self, client: TestClient) -> None:
        job = client.post("/v1/jobs", json={}).json()
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["waiting_reason"] is None
