"""The rules for jobs: creation, legal state transitions, cancellation. Services never commit."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from app.jobs.repository import JobRepository
from app.models import Job, JobStatus, utcnow
from app.spec import JobSpec


class JobNotFound(LookupError):
    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id} not found")


class InvalidTransition(Exception):
    """A state change the job's current status does not allow (invariant 5)."""


def create_job(session: Session, spec: JobSpec) -> Job:
    job = Job(
        name=spec.name,
        status=JobStatus.queued,
        spec=spec.model_dump(mode="json"),
        total_steps=spec.training.steps,
        step=0,
    )
    return JobRepository(session).add(job)


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
