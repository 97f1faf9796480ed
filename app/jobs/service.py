"""The rules for jobs: creation (limits, quota), legal state transitions, cancellation, what
becomes of a job whose attempt is lost, and who may see a job: its owner, or an admin. Another
user's job does not exist (JobNotFound, a 404). Services never commit."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth.repository import UserRepository
from app.config import Settings
from app.datasets.repository import DatasetRepository
from app.jobs.init_from import with_init_from
from app.jobs.limits import SpecRefused, check_spec
from app.jobs.repository import JobRepository
from app.jobs.scheduling import Places, ahead_reason
from app.jobs.schemas import JobOut
from app.models import Job, JobStatus, User, Worker, utcnow
from app.queue import Sender, Task, send_after_commit
from app.routing import Resources, can_hold, job_resources, queue_name, train_queue
from app.spec import PRIORITY_RANK, JobSpec
from app.usage import service as usage
from app.usage.repository import AttemptRepository
from app.webhooks import service as webhooks
from app.workers.repository import WorkerRepository


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
    session: Session,
    spec: JobSpec,
    *,
    owner: User,
    settings: Settings,
    dispatcher: Sender | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Store a queued job for `owner`, sent to its queue once the session commits (without a
    dispatcher it is only stored, and the sweeper sends it); returns (job, created). With an
    idempotency key, a repeat of the same request returns the first job (created=False), even
    when the repeats race each other. SpecRefused (422) when the spec exceeds the service's
    limits, QuotaExceeded (429) when the owner has too many queued and running jobs."""
    repo = JobRepository(session)
    digest = request_sha256(spec)
    # One submission per user at a time (PostgreSQL): the quota count and the insert agree.
    UserRepository(session).lock(owner.id)
    if idempotency_key is not None:
        existing = repo.get_by_idempotency_key(owner.id, idempotency_key)
        if existing is not None:
            return _replay(existing, digest, idempotency_key), False
    spec, dataset_id = with_dataset(session, spec, owner)
    spec = with_init_from(session, spec, owner)  # a fine-tune: its source checkpoint's step
    check_spec(spec, settings)
    active = repo.count_active(owner.id)
    if active >= settings.max_queued_jobs_per_user:
        raise QuotaExceeded(
            f"you have {active} queued or running jobs, the most this service allows per user "
            f"(DDPM_MAX_QUEUED_JOBS_PER_USER={settings.max_queued_jobs_per_user}); "
            "wait for one to finish or cancel one"
        )
    queue = train_queue(settings.queue, spec)
    job = Job(
        owner_id=owner.id,
        name=spec.name,
        status=JobStatus.queued,
        spec=spec.model_dump(mode="json"),
        total_steps=spec.training.steps,
        step=0,
        idempotency_key=idempotency_key,
        request_sha256=digest,
        dataset_id=dataset_id,
        queue=queue,
        priority=PRIORITY_RANK[spec.resources.priority],
        queued_at=utcnow(),
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
    if dispatcher is not None:
        send_after_commit(session, dispatcher, Task.train(job.id, queue))
    return job, True


def with_dataset(session: Session, spec: JobSpec, owner: User) -> tuple[JobSpec, uuid.UUID | None]:
    """A `dataset` job's spec with the data set's image_count filled in (so the stored spec, the
    memory estimate and the routing see it), and the data set's id. Only the owner's own ready
    data set will do, an admin's included: SpecRefused (422 on dataset.id) otherwise."""
    if spec.dataset.kind != "dataset" or spec.dataset.id is None:
        return spec, None
    dataset_id = uuid.UUID(spec.dataset.id)
    dataset = DatasetRepository(session).get(dataset_id, owner_id=owner.id)
    if dataset is None or dataset.status != "ready" or not dataset.image_count:
        if dataset is None:
            msg = f"data set {dataset_id} not found: use the id of one of your data sets (GET /v1/datasets)"
        elif dataset.status == "failed":
            msg = f"data set {dataset_id} failed to prepare ({dataset.error}); upload a usable one"
        else:
            msg = f"data set {dataset_id} is {dataset.status}; wait until it is ready"
        error = {"type": "value_error", "loc": ["body", "dataset", "id"], "msg": msg, "input": spec.dataset.id}
        raise SpecRefused([error])
    filled = spec.dataset.model_copy(update={"image_count": dataset.image_count})
    return spec.model_copy(update={"dataset": filled}), dataset_id


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
        webhooks.record_job_end(session, job)
    elif status is JobStatus.running:
        job.cancel_requested = True
    elif status is not JobStatus.cancelled:
        raise InvalidTransition(
            f"job {job_id} has already {status.value}; only queued or running jobs can be cancelled"
        )
    session.flush()
    return job


# --- lost attempts (the worker's side) ---------------------------------------------------------
def requeue_expired(session: Session, expired_before: datetime, max_attempts: int = 1_000_000) -> list[uuid.UUID]:
    """Running jobs whose lease ran out (their worker died or froze), each released as
    `release_attempt` decides; returns the ids of the re-queued jobs, to be sent again."""
    requeued = []
    for job in JobRepository(session).expired_leases(expired_before):
        reason = f"the worker running attempt {job.attempt} ({job.worker}) stopped renewing its lease"
        if _release(session, job, max_attempts, reason) is JobStatus.queued:
            requeued.append(job.id)
    session.flush()
    return requeued


def release_lost(session: Session, job_id: uuid.UUID, attempt: int, max_attempts: int, reason: str) -> JobStatus | None:
    """One attempt known to be lost (a rank of a multi-GPU job died), released at once as an
    expired lease would be; None when the attempt is no longer the job's current one."""
    job = JobRepository(session).get_running_attempt(job_id, attempt)
    if job is None:
        return None
    status = _release(session, job, max_attempts, reason)
    session.flush()
    return status


def _release(session: Session, job: Job, max_attempts: int, reason: str) -> JobStatus:
    """A lost attempt ended (its attempt row, at its last sign of life) and the job released; a job
    that ends there (failed, cancelled) records its webhook event in the same transaction."""
    AttemptRepository(session).end_lost(job.id, job.attempt)
    status = release_attempt(job, max_attempts, reason)
    if status is not JobStatus.queued:
        webhooks.record_job_end(session, job)
    return status


def release_attempt(job: Job, max_attempts: int, reason: str) -> JobStatus:
    """A running job whose attempt is lost: cancelled if a cancel was asked for, failed once it has
    used `max_attempts` attempts (graceful stops not counted), else back to the queue (not yet
    sent) to resume from its latest checkpoint."""
    lost = job.attempt - (job.stops or 0)
    if job.cancel_requested:
        job.status, job.finished_at = JobStatus.cancelled, utcnow()
    elif lost >= max_attempts:
        job.status, job.finished_at = JobStatus.failed, utcnow()
        job.error = f"gave up after {lost} attempts: {reason} at step {job.step}"
    else:
        job.status, job.dispatched_at, job.worker, job.queued_at = JobStatus.queued, None, None, utcnow()
    return JobStatus(job.status)


# --- what the API shows of a job ------------------------------------------------------------
def job_out(session: Session, job: Job, settings: Settings) -> JobOut:
    return jobs_out(session, [job], settings)[0]


def jobs_out(session: Session, jobs: list[Job], settings: Settings) -> list[JobOut]:
    """Jobs as the API shows them: with their queue, for queued ones why they wait, their
    GPU-seconds (one query per page) and a running job's ETA."""
    workers: list[Worker] | None = None
    used = usage.jobs_gpu_seconds(session, [job.id for job in jobs])
    places = Places.of(session, jobs, settings.max_running_gpus_per_user)
    shown = []
    for job in jobs:
        needs = job_resources(JobSpec.model_validate(job.spec))
        reason = None
        if job.status == JobStatus.queued:
            if workers is None:  # one query per page, only when a queued job needs it
                seen_after = utcnow() - timedelta(seconds=settings.lease_timeout_s)
                workers = WorkerRepository(session).live(settings.queue, seen_after)
            reason = places.over_cap(job) or waiting_reason(needs, workers, places.jobs_ahead(job))
        routed = {"queue": queue_name(settings.queue, needs), "waiting_reason": reason}
        measured = {"gpu_seconds": used[job.id], "eta_seconds": usage.eta_seconds(job)}
        shown.append(JobOut.model_validate({**_attributes(job), **routed, **measured}))
    return shown


def waiting_reason(needs: Resources, workers: list[Worker], ahead: int = 0) -> str:
    """Why a queued job has not started, from the live workers' advertised capacity, then the jobs
    the claim order puts before it (app/jobs/scheduling.py)."""
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
    if ahead > 0:
        return ahead_reason(ahead)
    return f"waiting for one of {len(capable)} running worker{'s' if len(capable) > 1 else ''} that can hold it"


def _attributes(job: Job) -> dict[str, object]:
    computed = ("queue", "waiting_reason", "gpu_seconds", "eta_seconds")
    return {name: getattr(job, name) for name in JobOut.model_fields if name not in computed}
