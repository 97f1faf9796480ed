"""The worker's Celery app. Start one worker per GPU, or one per host for multi-GPU jobs:

    celery -A worker.celery_app worker --pool=solo --concurrency=1 --loglevel=INFO

The solo pool runs the task in the worker process itself: no fork, so CUDA is never
initialised in a forked parent, and one job at a time holds the GPUs. A multi-GPU job's ranks
are spawned (fresh) processes, supervised from here. The worker consumes only the queues of jobs
it can hold (app/routing.py), from the GPUs and memory it detects or is told.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from app.config import get_settings
from app.queue import celery_config, celery_queue
from app.routing import worker_queues
from worker.capacity import detect_capacity, worker_name
from worker.shutdown import request_shutdown

log = logging.getLogger(__name__)

_settings = get_settings()
CAPACITY, DEVICE = detect_capacity(_settings)
celery_app = Celery("ddpm-jobs", include=["worker.tasks"])
celery_app.config_from_object(celery_config(_settings))
celery_app.conf.task_queues = [celery_queue(name) for name in worker_queues(_settings.queue, CAPACITY)]
app = celery_app  # `celery -A worker.celery_app` looks for `app` or `celery`


@worker_ready.connect
def _start_sweeper(**_: object) -> None:
    from worker.sweeper import start_sweeper

    log.info("worker %s offers %s (%s)", worker_name(), CAPACITY.describe(), DEVICE)
    start_sweeper(get_settings(), worker_name(), CAPACITY, DEVICE)


@worker_shutting_down.connect
def _shut_down(**_: object) -> None:
    """SIGTERM: the running job checkpoints at its next log point and is re-queued."""
    from worker.sweeper import stop_sweeper

    request_shutdown()
    stop_sweeper()
