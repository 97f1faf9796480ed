"""DDPM_LOG_FORMAT=json: one JSON object per line, with job_id, attempt and worker where known,
also from a thread started for the attempt (the lease's heartbeat, against a database that is away)."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import time
import uuid
from collections.abc import Iterator

import pytest

from app.config import Settings
from app.db import make_engine, make_sessionmaker
from app.log_format import bind_log, log_scope, set_worker, uvicorn_log_config
from worker.lease import Lease

JOB = uuid.uuid4()


@pytest.fixture
def lines(json_log: io.StringIO) -> Iterator[io.StringIO]:
    """What the root logger writes through a JSON handler while the test runs."""
    yield json_log
    set_worker(None)


def records(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_fields_where_known_and_only_inside_their_scope(lines: io.StringIO) -> None:
    log = logging.getLogger("tests.json")
    set_worker("host:42")
    log.info("before")
    with log_scope():
        bind_log(job_id=JOB, attempt=3)
        log.warning("claimed %s", "it")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    log.info("after")
    before, claimed, failed, after = records(lines)
    assert before == {
        "time": before["time"],
        "level": "INFO",
        "logger": "tests.json",
        "message": "before",
        "worker": "host:42",
    }
    assert claimed | {"time": None} == {
        "time": None, "level": "WARNING", "logger": "tests.json", "message": "claimed it",
        "job_id": str(JOB), "attempt": 3, "worker": "host:42",
    }  # fmt: skip
    assert failed["job_id"] == str(JOB) and "ValueError: boom" in failed["exc_info"]
    assert "job_id" not in after and "attempt" not in after


def test_the_heartbeat_thread_carries_the_attempt(lines: io.StringIO) -> None:
    away = make_sessionmaker(make_engine(Settings(database_url="postgresql+psycopg://u:p@127.0.0.1:1/none")))
    with log_scope():
        bind_log(job_id=JOB, attempt=2)
        with Lease(JOB, 2, timeout_s=30).heartbeat(away, interval_s=0.05):
            for _ in range(200):
                if "heartbeat failed" in lines.getvalue():
                    break
                time.sleep(0.05)
    beat = next(r for r in records(lines) if "heartbeat failed" in r["message"])
    assert (beat["logger"], beat["job_id"], beat["attempt"]) == ("worker.lease", str(JOB), 2)


def test_uvicorn_writes_json_with_the_service_loggers() -> None:
    assert uvicorn_log_config(Settings()) is None  # text: uvicorn's own configuration
    config = uvicorn_log_config(Settings(log_format="json"))
    assert config is not None
    logging.config.dictConfig(config)
    try:
        for name in ("uvicorn", "uvicorn.access", ""):
            handlers = logging.getLogger(name).handlers
            assert handlers and all(h.formatter.__class__.__name__ == "JsonFormatter" for h in handlers), name
    finally:
        loggers = {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.access")}
        logging.config.dictConfig(
            {"version": 1, "disable_existing_loggers": False, "root": {"handlers": []}, "loggers": loggers}
        )
