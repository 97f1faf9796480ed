"""The rules for jobs: creation (limits, quota), legal state transitions, cancellation, and who
may see a job: its owner, or an admin. Another user's job does not exist (JobNotFound, a 404).
Services never commit."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth.repository import UserRepository
from app.config import Settings
from app.jobs.limits import check_spec
from app.jobs.repository import JobRepository
from app.jobs.schemas import JobOut
from app.models import Job, JobStatus, User, Worker, utcnow
from app.routing import Resources, can_hold, job_resources, queue_name
from app.spec import JobSpec


class JobNotFound(LookupError):
    def __init__(self, job_id: uuid.UUID) -> None:
        super().__init__(f"job {job_id} not found")


class InvalidTransition(Exception):
    """A state change the job's current status does not allow (invariant 5)."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key reused with a different request body."""


class QuotaExceeded(Exception):
    """The user already has as many queued and running jobs as the service allows."""


def visible_owner(user: User) -> uuid.UUID | None:
    """The owner a user's queries are scoped to; None (everyone's) for an admin."""
    return None if user.is_admin else user.id


def request_sha256(spec: JobSpec) -> str:
    """Two bodies that resolve to the same spec are the same request."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def create_job(
    session: Session, spec: JobSpec, *, owner: User, settings: Settings, idempotency_key: str | None = None
) -> tuple[Job, bool]:
    """Store a queued job for `owner`; returns (job, created). With an idempotency key, a repeat
    of the same request returns the first job (created=False), even when the repeats race each
    other. SpecRefused (422) when the spec exceeds the service's limits, QuotaExceeded (429) when
    the owner has too many queued and running jobs."""
    repo = JobRepository(session)
    digest = request_sha256(spec)
    # One submission per user at a time (PostgreSQL): the quota count and the insert agree.
    UserRepository(session).lock(owner.id)
    if idempotency_key is not None:
        existing = repo.get_by_idempotency_key(owner.id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest, idempotency_key), False
    check_spec(spec, settings)
    active = repo.count_active(owner.id)
    if active >= settings.max_queued_jobs_per_user:
        raise QuotaExceeded(
            f"you have {active} queued or running jobs, the most this service allows per user "
            f"(DDPM_MAX_QUEUED_JOBS_PER_USER={settings.max_queued_jobs_per_user}); "
            "wait for one to finish or cancel one"
        )
    job = Job(
        owner_id=owner.id,
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
        existing = repo.get_by_idempotency_key(owner.id, idempotency_key) if idempotency_key else None
        if existing is None:
            raise
        return _replay(existing, digest, idempotency_key), False
    return job, True


def _replay(job: Job, digest: str, key: str) -> Job:
    if job.request_sha256 != digest:
        raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used with a different request body")
    return job


def get_job(session: Session, job_id: uuid.UUID, user: User) -> Job:
    job = JobRepository(session).get(job_id, owner_id=visible_owner(user))
    if job is None:
        raise JobNotFound(job_id)
    return job


def list_jobs(
    session: Session, user: User, *, limit: int, status: JobStatus | None, cursor: str | None
) -> tuple[list[Job], str | None]:
    """The user's jobs (an admin's: everyone's), newest first. InvalidCursor for a bad cursor."""
    return JobRepository(session).list_page(owner_id=visible_owner(user), limit=limit, status=status, cursor=cursor)


def cancel_job(session: Session, job_id: uuid.UUID, user: User) -> Job:
    """queued -> cancelled at once; running -> cancel requested (the worker stops at its next
    log boundary, keeps its checkpoints and ends `cancelled`). Repeating a cancel is harmless;
    cancelling a job that already succeeded or failed is refused."""
    job = JobRepository(session).get(job_id, owner_id=visible_owner(user), for_update=True)
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


# --- what the API shows of a job ------------------------------------------------------------
def job_out(session: Session, job: Job, settings: Settings) -> JobOut:
    return jobs_out(session, [job], settings)[0]


def jobs_out(session: Session, jobs: list[Job], settings: Settings) -> list[JobOut]:
    """Jobs as the API shows them: with their queue, and for queued ones why they wait."""
    workers: list[Worker] | None = None
    shown = []
    for job in jobs:
        needs = job_resources(JobSpec.model_validate(job.spec))
        reason = None
        if job.status == JobStatus.queued:
            if workers is None:  # one query per page, only when a queued job needs it
                seen_after = utcnow() - timedelta(seconds=settings.lease_timeout_s)
                live = select(Worker).where(Worker.queue == settings.queue, Worker.seen_at >= seen_after)
                workers = list(session.scalars(live))
            reason = waiting_reason(needs, workers)
        routed = {"queue": queue_name(settings.queue, needs), "waiting_reason": reason}
        shown.append(JobOut.model_validate({**_attributes(job), **routed}))
    return shown


def waiting_reason(needs: Resources, workers: list[Worker]) -> str:
    """Why a queued job has not started, from the live workers' advertised capacity."""
    if not workers:
        return "no worker is running: the job starts when one that can hold it checks in"
    capable = [w for w in workers if can_hold(Resources(w.gpus, w.gpu_memory_gb), needs)]
    if not capable:
        largest = max(workers, key=lambda w: (w.gpus, w.gpu_memory_gb))
        return (
            f"no running worker can hold this job: it needs {needs.describe()} "
            f"(the largest of {len(workers)} running worker{'s' if len(workers) > 1 else ''} offers "
            f"{Resources(largest.gpus, largest.gpu_memory_gb).describe()}); it starts when one that can checks in"
        )
    return f"waiting for one of {len(capable)} running worker{'s' if len(capable) > 1 else ''} that can hold it"


def _attributes(job: Job) -> dict[str, object]:
    return {name: getattr(job, name) for name in JobOut.model_fields if name not in ("queue", "waiting_reason")}
