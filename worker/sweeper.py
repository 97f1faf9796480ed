"""Recovery that Celery cannot be trusted with: a thread in every worker that, periodically,

- re-queues running jobs whose lease expired (their worker died; a new attempt resumes them
  from the latest checkpoint), and
- re-sends queued jobs that were never sent (the broker was down at submit time) or whose
  message went missing (sent long ago and still not claimed).

Both are idempotent, so several workers may sweep at once.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.jobs.repository import JobRepository
from app.models import utcnow
from app.queue import Dispatcher

log = logging.getLogger(__name__)
_stop = threading.Event()


def sweep_once(settings: Settings, factory, dispatcher: Dispatcher) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """One pass; returns (jobs re-queued after a lost lease, jobs (re-)sent)."""
    now = utcnow()
    with session_scope(factory) as session:
        requeued = JobRepository(session).requeue_expired(
            now - timedelta(seconds=settings.lease_timeout_s), settings.max_attempts
        )
    for job_id in requeued:
        log.warning("job %s: lease expired; re-queued to resume from its latest checkpoint", job_id)
    with session_scope(factory) as session:
        to_send = JobRepository(session).queued_needing_dispatch(now - timedelta(seconds=settings.resend_after_s))
    sent = 0
    for job_id in set(to_send) | set(requeued):
        try:
            dispatcher.send_train(str(job_id))
        except Exception as exc:  # broker still down: try again next sweep
            log.warning("job %s: could not send to the broker (%s)", job_id, exc)
            continue
        with session_scope(factory) as session:
            JobRepository(session).mark_dispatched(job_id)
        sent += 1
    return len(requeued), sent


def _loop(settings: Settings) -> None:
    factory = make_sessionmaker(make_engine(settings))
    dispatcher = Dispatcher(settings)
    interval = max(1.0, min(settings.heartbeat_interval_s, settings.resend_after_s / 2))
    while True:
        try:
            sweep_once(settings, factory, dispatcher)
        except DBAPIError as exc:  # the database is away; the next pass tries again
            log.warning("sweep skipped, database unavailable (%s); retrying in %.0fs", exc.orig, interval)
        except Exception:
            log.exception("sweep failed; retrying in %.0fs", interval)
        if _stop.wait(interval):
            return


def start_sweeper(settings: Settings) -> None:
    _stop.clear()
    threading.Thread(target=_loop, args=(settings,), name="ddpm-sweeper", daemon=True).start()


def stop_sweeper() -> None:
    _stop.set()
