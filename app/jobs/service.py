"""The rules for jobs: creation, legal state transitions, cancellation. Services never commit."""

from __future__ import annotations

import hashlib
import uuid

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.jobs.repository import JobRepository
from app.models import Job, JobStatus, utcnow
from app.spec import JobSpec


class JobNotFound(LookupError):
    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id} not found")


class InvalidTransition(Exception):
    """A state change the job's current status does not allow (invariant 5)."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key reused with a different request body."""


def request_sha256(spec: JobSpec) -> str:
    """Two bodies that resolve to the same spec are the same request."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def create_job(session: Session, spec: JobSpec, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Store a queued job; returns (job, created). With an idempotency key, a repeat of the same
    request returns the first job (created=False), even when the repeats race each other."""
    repo = JobRepository(session)
    digest = request_sha256(spec)
    if idempotency_key is not None:
        existing = repo.get_by_idempotency_key(idempotency_key)
        if existing is not None:
            return _replay(existing, digest, idempotency_key), False
    job = Job(
        name=spec.name,
        status=JobStatus.queued,
        spec=spec.model_dump(mode="json"),
        total_steps=spec.training.steps,
        step=0,
        idempotency_key=idempotency_key,
        request_sha256=digest,
    )
    try:
        with session.begin_nested():
            repo.add(job)
    except IntegrityError:
        # A concurrent request with the same key committed first: answer with its job.
        existing = repo.get_by_idempotency_key(idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, digest, idempotency_key), False
    return job, True


def _replay(job: Job, digest: str, key: str) -> Job:
    if job.request_sha256 != digest:
        raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used with a different request body")
    return job


def get_job(session: Session, job_id: uuid.UUID) -> Job:
    job = JobRepository(session).get(job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job


def cancel_job(session: Session, job_id: uuid.UUID) -> Job:
    """queued -> cancelled at once; running -> cancel requested (the worker stops at its next
    log boundary, keeps its checkpoints and ends `cancelled`). Repeating a cancel is harmless;
    cancelling a job that already succeeded or failed is refused."""
    job = JobRepository(session).get(job_id, for_update=True)
    if job is None:
        raise JobNotFound(job_id)
    status = JobStatus(job.status)
    if status is JobStatus.queued:
        job.status = JobStatus.cancelled
        job.cancel_requested = True
        job.finished_at = utcnow()
    elif status is JobStatus.running:
        job.cancel_requested = True
    elif status is not JobStatus.cancelled:
        raise InvalidTransition(
            f"job {job_id} has already {status.value}; only queued or running jobs can be cancelled"
        )
    session.flush()
    return job
