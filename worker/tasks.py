"""Thin Celery tasks: they take an id and hand it to the runner, which re-fetches the row.

A worker that is shutting down takes no new work: a task delivered after the signal (Celery's
loop drains the broker once more on its way out) goes back to the queue untouched.
"""

from __future__ import annotations

import logging
import uuid

from celery.exceptions import Reject

from worker.celery_app import celery_app
from worker.shutdown import shutdown_requested, stop_consuming

log = logging.getLogger(__name__)


def _parse(task: str, raw: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(raw)
    except (ValueError, TypeError):
        log.error("%s got %r, which is not an id; dropping the message", task, raw)
        return None


def _refuse_while_shutting_down(task: str, raw: str) -> None:
    if shutdown_requested():
        stop_consuming()
        log.info("%s %s: this worker is shutting down; the message goes back to the queue", task, raw)
        raise Reject("the worker is shutting down", requeue=True)


@celery_app.task(name="jobs.train")
def train(job_id: str) -> None:
    from worker.runner import get_runner

    _refuse_while_shutting_down("jobs.train", job_id)
    if (parsed := _parse("jobs.train", job_id)) is not None:
        get_runner().run(parsed)


@celery_app.task(name="jobs.sample")
def sample(request_id: str) -> None:
    from worker.runner import get_runner
    from worker.sample_task import draw_requested_samples

    _refuse_while_shutting_down("jobs.sample", request_id)
    if (parsed := _parse("jobs.sample", request_id)) is not None:
        runner = get_runner()
        draw_requested_samples(runner.settings, runner.sessionmaker, parsed)


@celery_app.task(name="datasets.prepare")
def prepare(dataset_id: str) -> None:
    """On the samples queue: every worker prepares, the samples-only one too (CPU work)."""
    from worker.dataset_task import prepare_dataset
    from worker.runner import get_runner

    _refuse_while_shutting_down("datasets.prepare", dataset_id)
    if (parsed := _parse("datasets.prepare", dataset_id)) is not None:
        runner = get_runner()
        prepare_dataset(runner.settings, runner.sessionmaker, parsed)
