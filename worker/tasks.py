"""Thin Celery tasks: they take an id and hand it to the runner, which re-fetches the row."""

from __future__ import annotations

import logging
import uuid

from worker.celery_app import celery_app

log = logging.getLogger(__name__)


def _parse(task: str, raw: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw)
    except (ValueError, TypeError):
        log.error("%s got %r, which is not an id; dropping the message", task, raw)
        return None


@celery_app.task(name="jobs.train")
def train(job_id: str) -> None:
    from worker.runner import get_runner

    if (parsed := _parse("jobs.train", job_id)) is not None:
        get_runner().run(parsed)


@celery_app.task(name="jobs.sample")
def sample(request_id: str) -> None:
    from worker.runner import get_runner
    from worker.sample_task import draw_requested_samples

    if (parsed := _parse("jobs.sample", request_id)) is not None:
        runner = get_runner()
        draw_requested_samples(runner.settings, runner.sessionmaker, parsed)
