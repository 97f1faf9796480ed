"""Fixtures of the worker's tests: a session factory on the test database, and a runner on it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.jobs.service import requeue_expired
from app.models import utcnow
from worker.runner import JobRunner


@pytest.fixture
def factory(clean_db: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(clean_db)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def runner(clean_db: Settings, factory: sessionmaker[Session]) -> JobRunner:
    return JobRunner(clean_db, factory)


def expire_lease(factory: sessionmaker[Session], job_id: uuid.UUID) -> None:
    """What the sweeper does once a running job's lease has run out: the job goes back to the
    queue and its attempt is no longer current. The sweeper skips a row another transaction holds
    (the attempt's heartbeat, at that instant) and takes it at its next pass: so does this."""
    deadline = time.monotonic() + 10
    while True:
        with session_scope(factory) as s:
            if job_id in requeue_expired(s, utcnow() + timedelta(hours=1)):
                return
        assert time.monotonic() < deadline, f"job {job_id} was never found with an expired lease"
        time.sleep(0.05)
