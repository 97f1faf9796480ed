"""The worker's shutdown flag: set on SIGTERM, read by the running job at its next log point.

Celery's `worker_shutting_down` (worker/celery_app.py) and a rank's SIGTERM handler
(worker/ranks.py) set it; the database sink then stops the loop with `StopReason.shutdown`, so the
job saves a checkpoint of that step and goes back to the queue inside the stop grace period.
"""

from __future__ import annotations

import threading

_SHUTDOWN = threading.Event()


def request_shutdown() -> None:
    _SHUTDOWN.set()


def shutdown_requested() -> bool:
    return _SHUTDOWN.is_set()
