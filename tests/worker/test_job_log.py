"""The job log: a failed attempt's traceback reaches the database, an attempt's lines are capped,
and a database that refuses them never stops the attempt. (Two real attempts, each with its own
lines: tests/worker/test_runner.py, the sample grids' resume.)"""

from __future__ import annotations

import logging
import uuid

import pytest
from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.models import JobLogLine
from tests.worker.test_runner import TINY, submit
from worker.job_log import capture_job_log
from worker.runner import JobRunner


def lines(factory, job_id: uuid.UUID) -> list[tuple[int, int, str, str, str]]:
    with session_scope(factory) as s:
        rows = s.scalars(select(JobLogLine).where(JobLogLine.job_id == job_id).order_by("attempt", "seq"))
        return [(r.attempt, r.seq, r.level, r.logger, r.message) for r in rows]


def test_a_failure_keeps_its_traceback(clean_db: Settings, factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker")
    folder = {"dataset": {"kind": "folder", "path": "no-such-folder", "image_size": 8}}
    job_id = submit(factory, TINY | folder)
    assert JobRunner(clean_db, factory).run(job_id) == "failed"
    errors = [msg for _, _, level, _, msg in lines(factory, job_id) if level == "ERROR"]
    assert len(errors) == 1
    assert errors[0].startswith(f"job {job_id}: attempt 1 failed: DatasetError")
    assert "Traceback (most recent call last):" in errors[0] and "no-such-folder" in errors[0]


def test_a_chatty_attempt_is_cut_at_the_cap_with_one_line_saying_so(clean_db: Settings, factory) -> None:
    job_id = submit(factory, TINY)
    chatty = logging.getLogger("worker.ddpm.chatty")
    chatty.setLevel(logging.INFO)
    try:
        with capture_job_log(factory, job_id, 1, max_lines=5, flush_every_s=0.05):
            for n in range(50):
                chatty.info("line %d", n)
    finally:
        chatty.setLevel(logging.NOTSET)
    kept = lines(factory, job_id)
    assert [msg for *_, msg in kept[:5]] == [f"line {n}" for n in range(5)]
    assert len(kept) == 6 and kept[5][:4] == (1, 5, "WARNING", "worker.job_log")
    assert kept[5][4].startswith("… truncated: this attempt logged more than 5 lines")


def test_a_database_that_refuses_the_lines_does_not_stop_the_attempt(clean_db: Settings, factory) -> None:
    job_id = submit(factory, TINY)
    away = make_sessionmaker(
        make_engine(clean_db.model_copy(update={"database_url": "postgresql+psycopg://x@127.0.0.1:1/x"}))
    )
    done = False
    with capture_job_log(away, job_id, 1, max_lines=100, flush_every_s=0.05):
        logging.getLogger("worker.attempt").warning("a line nobody can store")
        done = True
    assert done and lines(factory, job_id) == []
