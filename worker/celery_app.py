"""The worker's Celery app. Start one worker process per GPU with the solo pool:

    celery -A worker.celery_app worker --pool=solo --concurrency=1 --loglevel=INFO

The solo pool runs the task in the worker process itself: no fork, so CUDA is never
initialised in a forked parent, and one job at a time holds the GPU.
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from app.config import get_settings
from app.queue import celery_config

log = logging.getLogger(__name__)

celery_app = Celery("ddpm-jobs", include=["worker.tasks"])
celery_app.config_from_object(celery_config(get_settings()))
app = celery_app  # `celery -A worker.celery_app` looks for `app` or `celery`


@worker_ready.connect
def _start_sweeper(**_: object) -> None:
    from worker.sweeper import start_sweeper

    start_sweeper(get_settings())


@worker_shutting_down.connect
def _shut_down(**_: object) -> None:
    """SIGTERM: the running job checkpoints at its next log point and is re-queued."""
    from worker.runner import request_shutdown
    from worker.sweeper import stop_sweeper

    request_shutdown()
    stop_sweeper()
