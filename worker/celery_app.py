"""The worker's Celery app. Start one worker per GPU, or one per host for multi-GPU jobs:

    celery -A worker.celery_app worker --pool=solo --concurrency=1 --loglevel=INFO

The solo pool runs the task in the worker process itself: no fork, so CUDA is never
initialised in a forked parent, and one job at a time holds the GPUs. A multi-GPU job's ranks
are spawned (fresh) processes, supervised from here. The worker consumes only the queues of jobs
it can hold (app/routing.py), from the GPUs and memory it detects or is told, and the queue of
on-demand samples. With DDPM_WORKER_ROLE=samples it consumes only the samples queue: a light
worker beside a training one, so a sample request never waits for training to end.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, worker_ready, worker_shutting_down

from app.config import get_settings
from app.log_format import set_worker, use_json
from app.queue import celery_config, celery_queue
from app.routing import sample_queue, worker_queues
from worker.capacity import detect_capacity, worker_name
from worker.shutdown import on_stop_consuming, request_shutdown, stop_with_parent

log = logging.getLogger(__name__)

stop_with_parent()
_settings = get_settings()
CAPACITY, DEVICE = detect_capacity(_settings)
celery_app = Celery("ddpm-jobs", include=["worker.tasks"])
celery_app.config_from_object(celery_config(_settings))
SAMPLES_ONLY = _settings.worker_role == "samples"
_queues = [sample_queue(_settings.queue)]
if not SAMPLES_ONLY:
    _queues += worker_queues(_settings.queue, CAPACITY)
celery_app.conf.task_queues = [celery_queue(name) for name in _queues]
app = celery_app  # `celery -A worker.celery_app` looks for `app` or `celery`
set_worker(worker_name())  # the `worker` field of its JSON log lines


@after_setup_logger.connect
@after_setup_task_logger.connect
def _json_logs(logger: logging.Logger, **_: object) -> None:
    """DDPM_LOG_FORMAT=json: Celery's handlers write JSON lines (app/log_format.py)."""
    if get_settings().log_format == "json":
        for handler in logger.handlers:
            use_json(handler)


@worker_ready.connect
def _start_sweeper(sender: Any = None, **_: object) -> None:
    from worker.sweeper import start_sweeper
    from worker.webhooks import start_delivery

    if sender is not None:  # the worker's Consumer: how a shutting-down job stops further deliveries
        on_stop_consuming(lambda: sender.task_consumer.cancel())
    if SAMPLES_ONLY:
        log.info("worker %s draws on-demand samples only (%s)", worker_name(), DEVICE)
    else:
        log.info("worker %s offers %s (%s)", worker_name(), CAPACITY.describe(), DEVICE)
    start_sweeper(get_settings(), worker_name(), CAPACITY, DEVICE, sweep=not SAMPLES_ONLY)
    start_delivery(get_settings())  # webhook deliveries: every worker sends them


@worker_shutting_down.connect
def _shut_down(**_: object) -> None:
    """SIGTERM: the running job checkpoints at its next log point and is re-queued."""
    from worker.sweeper import stop_sweeper
    from worker.webhooks import stop_delivery

    request_shutdown()
    stop_sweeper()
    stop_delivery()
