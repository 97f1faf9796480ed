"""app/queue.py's send-after-commit path: a task goes out only once the outermost transaction
commits, is stamped `dispatched_at`, and is dropped with a rollback; the API's sends happen on a
background thread, so a submit never waits for the broker."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from kombu.exceptions import OperationalError
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import get_or_create_user
from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.jobs.service import create_job
from app.main import create_app
from app.models import Job
from app.queue import Dispatcher, Task, send_after_commit
from app.spec import JobSpec
from tests.conftest import ApiUser
from worker.sweeper import sweep_once


class Recorder:
    def __init__(self, broker_up: bool = True) -> None:
        self.broker_up = broker_up
        self.sent: list[tuple[str, str]] = []

    def send_train(self, job_id: str, queue: str) -> None:
        if not self.broker_up:
            raise OperationalError("Error 111 connecting to the broker")
        self.sent.append((job_id, queue))

    def send_sample(self, request_id: str) -> None:
        raise AssertionError("no sample request here")


@pytest.fixture
def factory(clean_db: Settings) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(clean_db))


def stored_job(session: Session) -> uuid.UUID:
    owner = get_or_create_user(session, "queue-owner")
    return create_job(session, JobSpec(), owner=owner, settings=Settings())[0].id


def dispatched_at(factory: sessionmaker[Session], job_id: uuid.UUID) -> object:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.dispatched_at


class TestSendAfterCommit:
    def test_sent_once_after_the_outermost_commit_and_stamped(self, factory: sessionmaker[Session]) -> None:
        sender = Recorder()
        with factory() as session:
            job_id = stored_job(session)
            send_after_commit(session, sender, Task.train(job_id, "q"))
            with session.begin_nested():  # a released savepoint commits nothing yet
                pass
            assert sender.sent == []
            session.commit()
            assert sender.sent == [(str(job_id), "q")]
            session.commit()  # a later commit does not send it again
        assert sender.sent == [(str(job_id), "q")]
        assert dispatched_at(factory, job_id) is not None

    def test_a_rollback_drops_the_task(self, factory: sessionmaker[Session]) -> None:
        sender = Recorder()
        with factory() as session:
            job_id = stored_job(session)
            send_after_commit(session, sender, Task.train(job_id, "q"))
            session.rollback()
            session.commit()
        assert sender.sent == []

    def test_broker_down_leaves_the_row_committed_and_undispatched(self, factory: sessionmaker[Session]) -> None:
        with factory() as session:
            job_id = stored_job(session)
            send_after_commit(session, Recorder(broker_up=False), Task.train(job_id, "q"))
            session.commit()
        assert dispatched_at(factory, job_id) is None

    def test_the_send_waits_for_no_second_connection(self, clean_db: Settings) -> None:
        """With a pool of one connection, the stamp still gets one: the committing session has
        handed its own back first. (Under load, requests each holding a connection while waiting
        for a second drained the pool: 500s from the API.)"""
        engine = create_engine(clean_db.database_url, pool_size=1, max_overflow=0, pool_timeout=2)
        sender = Recorder()
        with make_sessionmaker(engine)() as session:
            job_id = stored_job(session)
            send_after_commit(session, sender, Task.train(job_id, "q"))
            session.commit()
        assert sender.sent == [(str(job_id), "q")]
        with make_sessionmaker(engine)() as session:
            assert session.get(Job, job_id).dispatched_at is not None  # type: ignore[union-attr]
        engine.dispose()


@pytest.fixture
def stalled_broker_url() -> Iterator[str]:
    """A Redis URL whose connections hang until they time out, as when the broker's host is away:
    a listening socket that never accepts, its backlog already full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    host, port = listener.getsockname()
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex((host, port))
    yield f"redis://{host}:{port}/0"
    for sock in (*fillers, listener):
        sock.close()


class TestTheApiSendsInTheBackground:
    def test_a_submit_does_not_wait_for_an_unreachable_broker(
        self, clean_db: Settings, alice: ApiUser, factory: sessionmaker[Session], stalled_broker_url: str
    ) -> None:
        down = clean_db.model_copy(update={"broker_url": stalled_broker_url})
        with TestClient(create_app(down), headers=alice.headers) as client:
            started = time.monotonic()
            r = client.post("/v1/jobs", json={})
            elapsed = time.monotonic() - started
            assert r.status_code == 201, r.text
            job_id = uuid.UUID(r.json()["id"])
            assert dispatched_at(factory, job_id) is None
        # One connect timeout is 3 s (celery_config); the answer came without waiting for one.
        assert elapsed < 1.5
        assert dispatched_at(factory, job_id) is None  # the send failed on the sender thread

        with factory() as session:  # the sweeper sends it later, once the broker is back
            session.get(Job, job_id).created_at -= timedelta(hours=1)  # type: ignore[union-attr]
            session.commit()
        sender = Recorder()
        sweep_once(clean_db, factory, sender)
        assert (str(job_id), r.json()["queue"]) in sender.sent
        assert dispatched_at(factory, job_id) is not None

    def test_the_api_sends_after_the_commit_on_its_sender_thread(
        self, clean_db: Settings, factory: sessionmaker[Session]
    ) -> None:
        dispatcher = Dispatcher(clean_db, in_background=True)
        sent_on: list[str] = []
        sender_thread = threading.Event()

        def record(job_id: str, queue: str) -> None:
            sent_on.append(threading.current_thread().name)
            sender_thread.set()

        dispatcher.send_train = record  # type: ignore[method-assign]
        with factory() as session:
            job_id = stored_job(session)
            send_after_commit(session, dispatcher, Task.train(job_id, "q"))
            session.flush()
            assert sent_on == []
            session.commit()
        assert sender_thread.wait(10)
        dispatcher.drain()  # waits for the stamp
        assert sent_on[0].startswith("dispatch") and sent_on[0] != threading.current_thread().name
        assert dispatched_at(factory, job_id) is not None
