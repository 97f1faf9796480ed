"""The Celery configuration both sides share, and the API's way of sending work.

The API sends tasks by name with the job id only (invariant 2); it never imports the worker.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from app.config import Settings
from app.routing import sample_queue

TRAIN_TASK = "jobs.train"
SAMPLE_TASK = "jobs.sample"


def celery_config(settings: Settings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "task_default_queue": settings.queue,
        "task_ignore_result": True,  # the database holds every result
        # Acknowledge after the task returns: a worker that dies mid-job leaves its message for
        # another. A re-delivery of a job that is running or finished does nothing (the claim
        # in worker/runner.py is conditional), so Celery may deliver more than once.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "broker_transport_options": {},
    }
    if settings.broker_url.startswith("filesystem://"):
        folder = settings.broker_folder
        for sub in ("processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        config["broker_transport_options"] = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            # Exchange bindings; kombu's default is ./control, relative to the working directory.
            "control_folder": str(folder / "control"),
        }
    else:
        # Fail fast in the API when the broker is down instead of retrying for minutes.
        config["broker_connection_timeout"] = 3
        # How long Redis waits for an acknowledgement before re-delivering a task. Training
        # outlasts any sane value; a re-delivered job that is already running does nothing.
        visibility = settings.broker_visibility_timeout_s
        config["broker_transport_options"] = {"visibility_timeout": visibility, "socket_connect_timeout": 3}
        if visibility < 600:
            # A short visibility timeout (a chaos drill) only bites if idle workers sweep for
            # unacknowledged messages often; kombu's default sweep is every ~100 s.
            config["broker_transport_options"] |= {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    return config


def celery_queue(name: str) -> Queue:
    """A queue as Celery creates a missing one when a task is sent to it (a direct exchange of the
    same name), so that the worker's declaration and the API's sends agree."""
    return Queue(name, Exchange(name), routing_key=name)


def make_celery(settings: Settings) -> Celery:
    celery = Celery("ddpm-jobs")
    celery.config_from_object(celery_config(settings))
    return celery


class Dispatcher:
    """Sends training tasks to the broker for jobs that are already committed."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._celery = make_celery(settings)

    def send_train(self, job_id: str, queue: str) -> None:
        """Send to the job's queue (app.routing.train_queue). Raises an error from kombu/redis when
        the broker is unreachable."""
        self._celery.send_task(TRAIN_TASK, args=[job_id], queue=queue, retry=False)

    def send_sample(self, request_id: str) -> None:
        self._celery.send_task(SAMPLE_TASK, args=[request_id], queue=sample_queue(self._settings.queue), retry=False)

    def ping(self) -> None:
        with self._celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
