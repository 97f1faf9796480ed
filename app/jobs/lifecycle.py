"""A finished job's later life: deleted with everything it owns, or continued to more steps.

Deletion is crash-safe in three steps, each safe to repeat:

    mark     the request's transaction sets `deleted_at` and commits: from then on the job is
             gone for every reader (JobRepository.get and the list skip it; a repeat is a 204)
    files    with no pooled connection held: every stored file of the job removed, in the store
             and in this host's scratch: `<job id>/` (checkpoints, their resume state, sample
             grids) and `sample-requests/<request id>/` of each of its sample requests
    row      the jobs row deleted; ON DELETE CASCADE takes its metric points, checkpoint, sample,
             evaluation, sample-request, log and event rows; its `job_attempts` stay (job_id set null),
             so usage stays true

If the API dies (or the store is away) between the mark and the row, the sweeper finishes the
deletion once the mark is DELETION_GRACE_S old (worker/sweeper.py `finish_deletions`). Only a
finished job can be deleted, so no attempt of it is running; a sample request still being drawn
finds its job deleted when it ends and removes its own files (worker/sample_task.py).

Continuing sets a finished job's `training.steps` to more than it has done and queues it again:
the next claim resumes from its latest checkpoint, exactly as after a lost attempt, so the losses
are those of a job that had asked for the larger total from the start. Its earlier attempts stop
counting against DDPM_MAX_ATTEMPTS (`stops` = `attempt`: attempt numbers stay unique fencing
tokens, and only `attempt - stops` counts).
"""

from __future__ import annotations

import logging
import shutil
import uuid

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from app.auth.repository import UserRepository
from app.checkpoints.store import CheckpointFileError, CheckpointStore, StorageUnavailable
from app.config import Settings
from app.db import session_scope
from app.jobs.limits import SpecRefused
from app.jobs.repository import JobRepository
from app.jobs.service import InvalidTransition, JobNotFound, QuotaExceeded, visible_owner
from app.models import Job, JobStatus, User, utcnow
from app.queue import Sender, Task, send_after_commit
from app.routing import train_queue
from app.spec import JobSpec

log = logging.getLogger(__name__)

# A mark older than this whose row is still there: its deleter died (or its store was away).
DELETION_GRACE_S = 60.0


def mark_deleted(session: Session, job_id: uuid.UUID, user: User) -> uuid.UUID:
    """Mark a finished job deleted (the caller commits, then calls `remove_job`). A job already
    marked is answered the same (idempotent); a queued or running one is InvalidTransition (409)."""
    job = JobRepository(session).get(job_id, owner_id=visible_owner(user), for_update=True, include_deleted=True)
    if job is None:
        raise JobNotFound(job_id)
    if job.deleted_at is None:
        if not JobStatus(job.status).is_terminal:
            raise InvalidTransition(
                f"job {job_id} is {job.status}: cancel it first (POST /v1/jobs/{job_id}/cancel), "
                "then delete it once it has ended"
            )
        job.deleted_at = utcnow()
        session.flush()
    return job.id


def remove_job(factory: sessionmaker[Session], store: CheckpointStore, job_id: uuid.UUID) -> bool:
    """The files, then the row, of a job marked deleted; True once its row is gone. The store
    being away leaves the row (and the mark) for the sweeper to try again."""
    with session_scope(factory) as session:
        requests = JobRepository(session).sample_request_ids(job_id)
    prefixes = [f"{job_id}/", *(f"sample-requests/{request_id}/" for request_id in requests)]
    try:
        for prefix in prefixes:
            remove_prefix(store, prefix)
    except (StorageUnavailable, CheckpointFileError, OSError) as exc:
        log.warning("job %s: files not removed yet (%s); the sweeper finishes the deletion", job_id, exc)
        return False
    with session_scope(factory) as session:
        removed = JobRepository(session).delete_marked(job_id)
    log.info("job %s deleted: its files and rows are gone", job_id)
    return removed


def remove_prefix(store: CheckpointStore, prefix: str) -> None:
    """Every file under `prefix` (a folder key ending in /), in the store and this host's scratch."""
    for key in sorted(store.keys_under(prefix)):
        store.delete(key)
    shutil.rmtree(store.resolve(prefix), ignore_errors=True)  # the empty folders left


def continue_job(
    session: Session,
    job_id: uuid.UUID,
    user: User,
    steps: int,
    *,
    settings: Settings,
    dispatcher: Sender | None = None,
) -> Job:
    """A finished job queued again to train to `steps` in all (sent once the session commits).
    InvalidTransition (409) unless it has finished; SpecRefused (422 on `steps`) unless `steps`
    is more than it has done and within DDPM_MAX_STEPS; QuotaExceeded (429) as at submit."""
    repo = JobRepository(session)
    job = repo.get(job_id, owner_id=visible_owner(user))
    if job is None:
        raise JobNotFound(job_id)
    UserRepository(session).lock(job.owner_id)  # the quota count and the change agree, as at submit
    job = repo.get(job_id, for_update=True)
    if job is None:
        raise JobNotFound(job_id)
    if not JobStatus(job.status).is_terminal:
        raise InvalidTransition(
            f"job {job_id} is {job.status}; only a finished job (succeeded, failed or cancelled) can be continued"
        )
    spec = _with_steps(JobSpec.model_validate(job.spec), steps, job.step, settings)
    active = repo.count_active(job.owner_id)
    if active >= settings.max_queued_jobs_per_user:
        raise QuotaExceeded(
            f"the job's owner has {active} queued or running jobs, the most this service allows per user "
            f"(DDPM_MAX_QUEUED_JOBS_PER_USER={settings.max_queued_jobs_per_user}); wait for one to finish"
        )
    queue = train_queue(settings.queue, spec)
    job.spec, job.total_steps, job.queue = spec.model_dump(mode="json"), steps, queue
    job.status, job.finished_at, job.error, job.cancel_requested = JobStatus.queued, None, None, False
    job.worker, job.dispatched_at, job.metrics_downsampled_at, job.queued_at = None, None, None, utcnow()
    job.stops = job.attempt  # the attempts so far no longer count against DDPM_MAX_ATTEMPTS
    session.flush()
    if dispatcher is not None:
        send_after_commit(session, dispatcher, Task.train(job.id, queue))
    return job


def _with_steps(spec: JobSpec, steps: int, done: int, settings: Settings) -> JobSpec:
    refused = SpecRefused()
    if steps <= done:
        refused.add(("steps",), f"must be more than the {done} steps the job has done, got {steps}", steps)
    elif steps > settings.max_steps:
        limit = settings.max_steps
        refused.add(("steps",), f"at most {limit} on this service (DDPM_MAX_STEPS), got {steps}", steps, limit)
    if refused.errors:
        raise refused
    raw = spec.model_dump(mode="json")
    raw["training"]["steps"] = steps
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:  # a rule of the spec that ties another field to the steps
        refused.add(("steps",), f"the job's spec does not allow {steps} steps: {exc.errors()[0]['msg']}", steps)
        raise refused from exc
