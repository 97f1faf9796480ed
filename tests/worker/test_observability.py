"""What a worker records for operators, on a real (tiny) in-process job: its log lines carry the
job id and attempt (DDPM_LOG_FORMAT=json) within the delivery only, and each checkpoint row its
write seconds (GET /metrics)."""

from __future__ import annotations

import io
import json
import logging

import pytest
from sqlalchemy import select

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.models import Checkpoint
from tests.worker.test_runner import TINY, submit
from worker.runner import JobRunner


@pytest.mark.slow  # a tiny job end to end: ~20 s alone, minutes on a busy 2-core machine
def test_a_job_logs_its_id_and_attempt_and_times_its_checkpoint_writes(
    clean_db: Settings, json_log: io.StringIO
) -> None:
    factory = make_sessionmaker(make_engine(clean_db))
    job_id = submit(factory, TINY)
    assert JobRunner(clean_db, factory).run(job_id) == "succeeded"
    logging.getLogger("tests.after").info("after the delivery")

    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    claimed = next(r for r in records if "claimed by" in r["message"])
    ended = next(r for r in records if "ended succeeded" in r["message"])
    for record in (claimed, ended):
        assert (record["logger"], record["job_id"], record["attempt"]) == ("worker.attempt", str(job_id), 1)
    assert "job_id" not in records[-1] and records[-1]["message"] == "after the delivery"

    with session_scope(factory) as s:
        seconds = list(s.scalars(select(Checkpoint.write_seconds).where(Checkpoint.job_id == job_id)))
    assert len(seconds) == 2 and all(0 < v < 60 for v in seconds), seconds
