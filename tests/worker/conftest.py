"""Fixtures of the worker's tests: a session factory on the test database, and a runner on it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from worker.runner import JobRunner


@pytest.fixture
def factory(clean_db: Settings) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(clean_db)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def runner(clean_db: Settings, factory: sessionmaker[Session]) -> JobRunner:
    return JobRunner(clean_db, factory)
