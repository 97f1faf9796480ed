"""Recovery that Celery cannot be trusted with: a thread in every worker that, periodically,

- re-queues running jobs whose lease expired (their worker died; a new attempt resumes them
  from the latest checkpoint), and
- re-sends queued jobs that were never sent (the broker was down at submit time) or whose
  message went missing (sent long ago and still not claimed), each to its own queue, and
- records what this worker offers in the `workers` table (seen_at says it is alive), which the
  API reads to explain why a job waits, and
- re-queues sample requests whose worker stopped checking in mid-draw, and sends them and the
  queued requests never sent or whose message went missing, as for jobs, and
- finishes job deletions that a crash (or a store away) interrupted, and thins the metric points
  of finished jobs older than DDPM_METRICS_RETENTION_DAYS (app/metrics/retention.py), and
- for data sets: deletes uploads broken off and idle for DDPM_DATASET_UPLOAD_EXPIRY_S (row and
  bytes), frees preparations whose worker stopped checking in, and sends the prepare task of
  those never sent, sent long ago and never taken, or freed.

Sending goes through app.queue.dispatch, which stamps `dispatched_at` once the broker took it.

All are idempotent, so several workers may sweep at once. After each pass that worked (the
database answered), it touches DDPM_WORKER_HEALTH_FILE, which compose's worker healthcheck reads
the age of; the file goes when the worker stops.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from app.checkpoints.store import CheckpointStore, make_store
from app.config import Settings
from app.datasets import service as datasets
from app.datasets.repository import DatasetRepository
from app.db import make_engine, make_sessionmaker, session_scope
from app.jobs import lifecycle, service
from app.jobs.repository import JobRepository
from app.metrics.retention import thin_job_metrics
from app.models import Job, utcnow
from app.queue import Dispatcher, Sender, Task, dispatch, engine_of
from app.routing import Resources, sample_queue, train_queue
from app.samples.repository import SampleRepository, requeue_orphaned_requests
from app.spec import JobSpec
from app.workers.repository import WorkerRepository

log = logging.getLogger(__name__)
_stop = threading.Event()
# DDPM_WORKER_HEALTH_FILE of the running sweeper: touched after each pass, removed on stop.
_health_file: Path | None = None


def sweep_once(  # type: ignore[no-untyped-def]
    settings: Settings, factory, dispatcher: Sender, store: CheckpointStore | None = None
) -> tuple[int, int]:
    """One pass; returns (jobs re-queued after a lost lease, jobs (re-)sent)."""
    now = utcnow()
    older_than = now - timedelta(seconds=settings.resend_after_s)
    with session_scope(factory) as session:
        engine = engine_of(session)
        requeued = service.requeue_expired(
            session, now - timedelta(seconds=settings.lease_timeout_s), settings.max_attempts
        )
    for job_id in requeued:
        log.warning("job %s: lease expired; re-queued to resume from its latest checkpoint", job_id)
    with session_scope(factory) as session:
        cap = settings.max_running_gpus_per_user
        waiting = JobRepository(session).queued_needing_dispatch(older_than, cap=cap)
        to_send = {job.id for job in waiting} | set(requeued)
        jobs = [Task.train(job_id, job_queue(settings, session.get(Job, job_id))) for job_id in to_send]
    sent = sum(dispatch(engine, dispatcher, task) for task in jobs)
    with session_scope(factory) as session:
        orphaned = requeue_orphaned_requests(session, now - timedelta(seconds=settings.lease_timeout_s))
        unsent = {r.id for r in SampleRepository(session).requests_needing_dispatch(older_than)}
    for request_id in orphaned:
        log.warning("sample request %s: its worker is gone; re-queued", request_id)
    for request_id in sorted(unsent | set(orphaned)):
        dispatch(engine, dispatcher, Task.sample(request_id))
    store = store or make_store(settings)
    sweep_datasets(settings, factory, dispatcher, store)
    finish_deletions(factory, store)
    downsample_metrics(settings, factory)
    return len(requeued), sent


def finish_deletions(factory, store: CheckpointStore, grace_s: float = lifecycle.DELETION_GRACE_S) -> int:  # type: ignore[no-untyped-def]
    """Jobs marked deleted more than `grace_s` ago whose row is still there (the API died between
    the mark and the row, or the store was away): their files, then their rows; how many finished."""
    with session_scope(factory) as session:
        marked = JobRepository(session).deleted_before(utcnow() - timedelta(seconds=grace_s))
    for job_id in marked:
        log.warning("job %s: finishing its interrupted deletion", job_id)
    return sum(lifecycle.remove_job(factory, store, job_id) for job_id in marked)


def downsample_metrics(settings: Settings, factory) -> int:  # type: ignore[no-untyped-def]
    """Finished jobs older than DDPM_METRICS_RETENTION_DAYS (when > 0) keep at most
    DDPM_METRICS_RETENTION_POINTS metric points, one job per transaction; how many were thinned."""
    if settings.metrics_retention_days <= 0:
        return 0
    with session_scope(factory) as session:
        due = JobRepository(session).due_for_downsampling(utcnow() - timedelta(days=settings.metrics_retention_days))
    done = 0
    for job_id in due:
        with session_scope(factory) as session:
            thinned = thin_job_metrics(session, job_id, settings.metrics_retention_points)
        if thinned is not None:
            log.info("job %s: metric points downsampled, %d -> %d", job_id, thinned.before, thinned.after)
            done += 1
    return done


def sweep_datasets(settings: Settings, factory, dispatcher: Sender, store: CheckpointStore) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """The data set passes; returns (stale uploads deleted, preparations (re-)sent)."""
    return expire_uploads(settings, factory, store), sweep_preparations(settings, factory, dispatcher)


def expire_uploads(settings: Settings, factory, store: CheckpointStore) -> int:  # type: ignore[no-untyped-def]
    """Uploads broken off and idle for DDPM_DATASET_UPLOAD_EXPIRY_S go, row and bytes; how many."""
    idle_since = utcnow() - timedelta(seconds=settings.dataset_upload_expiry_s)
    with session_scope(factory) as session:
        keys = datasets.expire_stale_uploads(session, idle_since)
    for key in keys:
        log.warning("data set upload %s: idle for %.0f s; deleted", key, settings.dataset_upload_expiry_s)
    datasets.remove_files(store, keys)  # once no row names them
    return len(keys)


def sweep_preparations(settings: Settings, factory, dispatcher: Sender) -> int:  # type: ignore[no-untyped-def]
    """Data sets whose preparing worker stopped checking in (killed mid-way) are freed, and they
    and the preparations never sent (or whose message went missing) are sent again; how many."""
    now = utcnow()
    with session_scope(factory) as session:
        engine = engine_of(session)
        repo = DatasetRepository(session)
        orphaned = repo.requeue_orphaned_preparations(now - timedelta(seconds=settings.lease_timeout_s))
    for dataset_id in orphaned:
        log.warning("data set %s: its preparing worker is gone; sending it again", dataset_id)
    with session_scope(factory) as session:
        older_than = now - timedelta(seconds=settings.resend_after_s)
        unsent = {d.id for d in DatasetRepository(session).preparations_needing_dispatch(older_than)}
    to_send = sorted(unsent | set(orphaned))
    return sum(dispatch(engine, dispatcher, Task.prepare(dataset_id)) for dataset_id in to_send)


def job_queue(settings: Settings, job: Job | None) -> str:
    return train_queue(settings.queue, JobSpec.model_validate(job.spec if job is not None else {}))


def check_in(factory, name: str, settings: Settings, capacity: Resources, device: str, sweep: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Record (or refresh) this worker's row: what it offers, and that it is alive now. A
    samples-only worker (`sweep` False) checks in under its queue's name, not DDPM_QUEUE: alive
    for the requests it draws, but never counted as a worker that could train a waiting job."""
    queue = settings.queue if sweep else sample_queue(settings.queue)
    with session_scope(factory) as session:
        WorkerRepository(session).check_in(name, queue, capacity, device)


def check_out(factory, name: str) -> None:  # type: ignore[no-untyped-def]
    with session_scope(factory) as session:
        WorkerRepository(session).check_out(name)


def _loop(settings: Settings, name: str, capacity: Resources, device: str, sweep: bool) -> None:
    factory = make_sessionmaker(make_engine(settings))
    dispatcher = Dispatcher(settings)
    store = make_store(settings)
    interval = max(1.0, min(settings.heartbeat_interval_s, settings.resend_after_s / 2))
    while True:
        try:
            check_in(factory, name, settings, capacity, device, sweep)
            if sweep:
                sweep_once(settings, factory, dispatcher, store)
            if _health_file is not None and not _stop.is_set():
                _health_file.touch()
        except DBAPIError as exc:  # the database is away; the next pass tries again
            log.warning("sweep skipped, database unavailable (%s); retrying in %.0fs", exc.orig, interval)
        except Exception:
            log.exception("sweep failed; retrying in %.0fs", interval)
        if _stop.wait(interval):
            try:
                check_out(factory, name)
            except DBAPIError as exc:  # it ages out of the table instead
                log.warning("could not remove this worker's row (%s)", exc.orig)
            return


def start_sweeper(settings: Settings, name: str, capacity: Resources, device: str, sweep: bool = True) -> None:
    """The sweeper thread; with `sweep` False (a samples-only worker) it only checks in."""
    global _health_file
    _stop.clear()
    _health_file = settings.worker_health_file
    args = (settings, name, capacity, device, sweep)
    threading.Thread(target=_loop, args=args, name="ddpm-sweeper", daemon=True).start()


def stop_sweeper() -> None:
    """Stop sweeping; the health file goes now, so a stopping worker is no longer healthy."""
    _stop.set()
    if _health_file is not None:
        _health_file.unlink(missing_ok=True)
