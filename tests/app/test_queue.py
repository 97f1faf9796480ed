"""app/queue.py's send-after-commit path: a task goes out only once the outermost transaction
commits, is stamped `dispatched_at`, and is dropped with a rollback."""

from __future__ import annotations

import uuid

import pytest
from kombu.exceptions import OperationalError
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.auth.service import get_or_create_user
from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.jobs.service import create_job
from app.models import Job
from app.queue import Task, send_after_commit
from app.spec import JobSpec


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
