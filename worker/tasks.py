"""Thin Celery tasks: they take a job id and hand it to the runner, which re-fetches the row."""

from __future__ import annotations

import logging
import uuid

from worker.celery_app import celery_app

log = logging.getLogger(__name__)


@celery_app.task(name="jobs.train")
def train(job_id: str) -> None:
    from worker.runner import get_runner

    try:
        parsed = uuid.UUID(job_id)
    except (ValueError, TypeError):
        log.error("jobs.train got %r, which is not a job id; dropping the message", job_id)
        return
    get_runner().run(parsed)


@celery_app.task(name="jobs.sample")
def sample(request_id: str) -> None:
    from worker.runner import draw_requested_samples, get_runner

    try:
        parsed = uuid.UUID(request_id)
    except (ValueError, TypeError):
        log.error("jobs.sample got %r, which is not a sample request id; dropping the message", request_id)
        return
    runner = get_runner()
    draw_requested_samples(runner.settings, runner.sessionmaker, parsed)
