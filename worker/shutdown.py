"""The worker's shutdown: a flag set on SIGTERM, and the way to stop taking new tasks.

Celery's `worker_shutting_down` (worker/celery_app.py) and a rank's SIGTERM handler
(worker/ranks.py) set the flag; the database sink then stops the loop with `StopReason.shutdown`,
so the job saves a checkpoint of that step and goes back to the queue inside the stop grace period.

Before a job goes back to the queue, the worker stops consuming (`stop_consuming`): Celery's loop
drains the broker once more on its way out, and would otherwise take the very job it just
re-queued and claim it again, leaving it `running` on a worker about to exit. The consumers are
cancelled from the task's own thread (the solo pool runs tasks on Celery's loop thread), never
from the signal handler, which may interrupt kombu mid-poll.

A worker `ddpm-jobs serve` started also stops when serve dies without stopping it (`stop_with_parent`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

from app.embedded import PARENT_VARIABLE

_SHUTDOWN = threading.Event()
_stop_consuming: Callable[[], None] | None = None


def request_shutdown() -> None:
    _SHUTDOWN.set()


def shutdown_requested() -> bool:
    return _SHUTDOWN.is_set()


def on_stop_consuming(stop: Callable[[], None] | None) -> None:
    """Register how this worker stops taking tasks (its Celery consumer's cancel); None: forget it."""
    global _stop_consuming
    _stop_consuming = stop


def stop_consuming() -> None:
    """Take no more tasks from the broker (once; nothing to do outside a Celery worker)."""
    global _stop_consuming
    stop, _stop_consuming = _stop_consuming, None
    if stop is not None:
        stop()


# prctl(2): the signal the kernel sends this process when its parent dies.
PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """In a worker `ddpm-jobs serve` started (PARENT_VARIABLE set): a SIGTERM when serve dies, even
    by SIGKILL, so the worker shuts down as on any stop (the running job checkpoints and goes back
    to the queue) instead of living on as an orphan. Linux only; elsewhere nothing is done."""
    parent = os.environ.get(PARENT_VARIABLE)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return
    if os.getppid() != int(parent):  # serve died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
