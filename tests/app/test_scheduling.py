"""The claim order, the per-user GPU cap and the turns a job's end sends (app/jobs/scheduling.py,
JobRepository.claim_next), against the real PostgreSQL; no worker, no training."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.jobs import scheduling
from app.jobs.repository import JobRepository
from app.jobs.service import create_job
from app.main import create_app
from app.models import Job, JobStatus, User, utcnow
from app.routing import Resources
from app.spec import JobSpec
from tests.conftest import MakeUser
from worker.sweeper import check_in


class Recorder:
    """A Sender that keeps what it was asked to send."""

    def __init__(self) -> None:
        self.train: list[tuple[str, str]] = []

    def send_train(self, job_id: str, queue: str) -> None:
        self.train.append((job_id, queue))

    def send_sample(self, request_id: str) -> None:
        raise AssertionError("no samples here")

    def send_prepare(self, dataset_id: str) -> None:
        raise AssertionError("no data sets here")


@pytest.fixture
def factory(clean_db: Settings) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(clean_db))


@pytest.fixture
def users(make_user: MakeUser) -> dict[str, User]:
    return {name: make_user(name).user for name in ("alice", "bob", "carol")}


class Queue:
    """Jobs submitted through create_job, and the claims a worker would make."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings, users: dict[str, User]) -> None:
        self.factory, self.settings, self.users = factory, settings, users

    def submit(self, name: str, owner: str, priority: str = "normal", gpus: int = 1) -> uuid.UUID:
        spec = JobSpec.model_validate({"name": name, "resources": {"priority": priority, "gpus": gpus}})
        with session_scope(self.factory) as s:
            job_id = create_job(s, spec, owner=self.users[owner], settings=self.settings)[0].id
        return job_id

    def queue_of(self, job_id: uuid.UUID) -> str:
        with session_scope(self.factory) as s:
            return s.get_one(Job, job_id).queue or ""

    def claim(self, hint: uuid.UUID, cap: int = 0) -> str | None:
        """What a delivery of `hint`'s message claims: the job's name, or None."""
        with session_scope(self.factory) as s:
            taken = scheduling.claim_turn(s, hint, "w", cap)
            return s.get_one(Job, taken[0]).name if taken else None

    def end(self, job_id: uuid.UUID, sender: Recorder | None = None, cap: int = 0) -> None:
        with session_scope(self.factory) as s:
            s.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.succeeded, finished_at=utcnow()))
            if sender is not None:
                scheduling.send_next_turn(s, sender, job_id, cap)


@pytest.fixture
def queue(factory: sessionmaker[Session], clean_db: Settings, users: dict[str, User]) -> Queue:
    return Queue(factory, clean_db, users)


class TestClaimOrder:
    def test_higher_priority_first_then_users_take_turns(self, queue: Queue) -> None:
        a1, a2, a3 = (queue.submit(f"a{i}", "alice") for i in (1, 2, 3))
        queue.submit("b1", "bob")
        queue.submit("c-low", "carol", priority="low")
        queue.submit("c-high", "carol", priority="high")
        # Every delivery is a turn of the queue, whichever job's message it carries.
        assert [queue.claim(a1) for _ in range(3)] == ["c-high", "a1", "b1"]
        # Only Alice has normal jobs left: the delivered one before her others.
        assert queue.claim(a3) == "a3"
        assert queue.claim(a2) == "a2"
        assert queue.claim(a2) == "c-low"
        assert queue.claim(a2) is None

    def test_never_started_first_then_the_oldest_latest_start(self, queue: Queue) -> None:
        b1 = queue.submit("b1", "bob")
        a1 = queue.submit("a1", "alice")
        assert queue.claim(a1) == "a1"  # a tie between users: the delivered job's owner
        queue.end(a1)
        assert queue.claim(b1) == "b1"
        queue.end(b1)
        a2, b2, c1 = queue.submit("a2", "alice"), queue.submit("b2", "bob"), queue.submit("c1", "carol")
        assert [queue.claim(a2) for _ in range(3)] == ["c1", "a2", "b2"]  # Carol never started; Alice first
        assert b2 and c1

    def test_the_user_with_fewer_gpus_running_goes_first(self, queue: Queue) -> None:
        b_big, a1 = queue.submit("b-big", "bob", gpus=2), queue.submit("a1", "alice")
        assert queue.claim(b_big) == "b-big"  # Bob holds 2 GPUs (another queue: 2-GPU jobs)
        assert queue.claim(a1) == "a1"  # Alice 1, and hers is the latest start
        a2, b2 = queue.submit("a2", "alice"), queue.submit("b2", "bob")
        assert queue.claim(b2) == "a2"  # Alice holds fewer GPUs: hers, though Bob's message came
        assert queue.claim(b2) == "b2"
        assert a2

    def test_a_job_stored_before_0012_is_claimed_alone(self, queue: Queue, factory: sessionmaker[Session]) -> None:
        old, other = queue.submit("old", "alice"), queue.submit("other", "bob", priority="high")
        with session_scope(factory) as s:
            s.execute(update(Job).where(Job.id == old).values(queue=None))
        assert queue.claim(old) == "old"
        assert queue.claim(old) is None  # running: its delivery does nothing, as before
        assert queue.claim(other) == "other"

    def test_deleted_jobs_are_never_claimed(self, queue: Queue, factory: sessionmaker[Session]) -> None:
        gone, kept = queue.submit("gone", "alice", priority="high"), queue.submit("kept", "bob")
        with session_scope(factory) as s:
            s.execute(update(Job).where(Job.id == gone).values(deleted_at=utcnow()))
        assert queue.claim(kept) == "kept"
        assert queue.claim(kept) is None


class TestCap:
    def test_a_user_at_the_cap_waits_and_the_end_of_their_job_sends_a_turn(
        self, queue: Queue, factory: sessionmaker[Session]
    ) -> None:
        a1, a2 = queue.submit("a1", "alice"), queue.submit("a2", "alice")
        b1 = queue.submit("b1", "bob", priority="low")
        assert queue.claim(a1, cap=1) == "a1"
        assert queue.claim(a2, cap=1) == "b1"  # a2 is over Alice's cap: a low one of Bob's goes first
        assert queue.claim(b1, cap=1) is None
        # (create_job without a dispatcher sends nothing: every job here has no message.)
        sender = Recorder()
        queue.end(b1, sender, cap=1)  # Bob's end frees nothing for Alice
        assert sender.train == []
        queue.end(a1, sender, cap=1)
        assert sender.train == [(str(a2), queue.queue_of(a2))]
        assert queue.claim(a2, cap=1) == "a2"

    def test_a_turn_that_finds_nothing_leaves_its_job_without_a_message(
        self, queue: Queue, factory: sessionmaker[Session], clean_db: Settings
    ) -> None:
        a1, a2 = queue.submit("a1", "alice"), queue.submit("a2", "alice")
        assert queue.claim(a1, cap=1) == "a1"
        assert queue.claim(a2, cap=1) is None
        with session_scope(factory) as s:
            assert s.get_one(Job, a2).dispatched_at is None
            s.execute(update(Job).values(created_at=utcnow() - timedelta(hours=1)))
            # The sweeper does not send it round and round while Alice is at the cap...
            later = utcnow() + timedelta(seconds=1)
            assert JobRepository(s).queued_needing_dispatch(later, cap=1) == []
            # ...but does once her job has ended (if the end's own turn was lost).
            s.execute(update(Job).where(Job.id == a1).values(status=JobStatus.succeeded))
            assert [j.id for j in JobRepository(s).queued_needing_dispatch(later, cap=1)] == [a2]

    def test_claims_on_two_queues_never_exceed_the_cap_together(
        self, queue: Queue, factory: sessionmaker[Session]
    ) -> None:
        one, two = queue.submit("one", "alice", gpus=1), queue.submit("two", "alice", gpus=2)
        assert queue.queue_of(one) != queue.queue_of(two)
        first = factory()
        try:
            assert JobRepository(first).claim_next(queue.queue_of(one), "w1", hint=one, cap=3) is not None
            # The first claim holds Alice's row until it commits; the second waits, then counts again.
            second: list[object] = []
            thread = threading.Thread(target=lambda: second.append(queue.claim(two, cap=2)))
            thread.start()
            thread.join(timeout=1)
            assert thread.is_alive(), "the second claim must wait for the first"
            first.commit()
        finally:
            first.close()
        thread.join(timeout=10)
        assert second == [None]  # 1 running + 2 > 2


class TestWaitingReason:
    def test_over_the_cap_then_jobs_ahead(self, clean_db: Settings, make_user: MakeUser, queue: Queue) -> None:
        settings = clean_db.model_copy(update={"max_running_gpus_per_user": 2})
        factory = make_sessionmaker(make_engine(settings))
        check_in(factory, "host-a:1", settings, Resources(1, 16), "cpu")
        alice, bob = make_user("alice"), make_user("bob")
        with TestClient(create_app(settings)) as client:
            a1, a2, a3 = (client.post("/v1/jobs", json={"name": n}, headers=alice.headers).json()["id"] for n in "123")
            b1 = client.post("/v1/jobs", json={"name": "b1"}, headers=bob.headers).json()["id"]
            body = {"name": "high", "resources": {"priority": "high"}}
            high = client.post("/v1/jobs", json=body, headers=bob.headers).json()

            def reason(user_headers: dict[str, str], job_id: str) -> str:
                return client.get(f"/v1/jobs/{job_id}", headers=user_headers).json()["waiting_reason"]

            def ahead(count: int) -> str:
                return f"{count} job{'s' if count != 1 else ''} ahead of it (higher priority, or other users' turn)"

            assert high["waiting_reason"] == "waiting for one of 1 running worker that can hold it"
            # high, then Alice's first, then Bob's (users take turns), then Alice's second; her
            # third can start only when one of her two earlier ones ends (the cap is 2).
            assert [reason(alice.headers, a1), reason(bob.headers, b1)] == [ahead(1), ahead(2)]
            assert [reason(alice.headers, a2), reason(alice.headers, a3)] == [ahead(3), ahead(4)]
            assert [queue.claim(uuid.UUID(high["id"]), cap=2) for _ in range(4)] == ["high", "1", "b1", "2"]
            assert reason(alice.headers, a3) == (
                "you have 2 GPUs in running jobs, the most DDPM_MAX_RUNNING_GPUS_PER_USER=2 allows: "
                "it starts when one of them ends"
            )
            listed = client.get("/v1/jobs", headers=alice.headers).json()["items"]
            assert [j["waiting_reason"] for j in listed] == [reason(alice.headers, a3), None, None]
