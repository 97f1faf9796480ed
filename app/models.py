"""SQLAlchemy 2 models: users and their API keys, jobs, their metric points and checkpoints.

The jobs table is the source of truth for a job's state (ARCHITECTURE.md invariant 1). A worker
writes to a job only while its `attempt` is the current one.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.status import JobStatus

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


MAX_STEP = 2**31 - 1  # steps are 32-bit integers (Integer columns): the largest a route accepts


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    """Whoever owns jobs. An admin sees and manages every user's jobs."""

    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """An API key, stored only as HMAC-SHA256(secret_key, key); `prefix` finds it and shows it."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship(lazy="raise")


_STATUS_VALUES = ", ".join(f"'{s.value}'" for s in JobStatus)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUS_VALUES})", name="status_valid"),
        # An Idempotency-Key belongs to its user: another user's key never finds this job.
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_id_idempotency_key"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.queued)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    total_steps: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    # Fencing token: bumped by every claim; writes carry the attempt they were made under.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts that ended in a graceful stop (worker shutdown): they do not count against
    # DDPM_MAX_ATTEMPTS, so restarting workers never uses up a job's budget.
    stops: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the training task was last handed to the broker (None: not yet, or sending failed).
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Idempotent submit: a repeated Idempotency-Key returns this job; the request hash tells a
    # repeat (same body) from a conflicting reuse of the key (another body).
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    # The uploaded data set the job trains on (spec dataset.kind "dataset"): a data set in use by a
    # queued or running job cannot be deleted.
    dataset_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    # The Celery queue of the workers that can hold the job (app/routing.py), and its priority
    # (app/spec.py PRIORITY_RANK: higher first): the claim picks the next job of a queue by them
    # (null queue: a job stored before 0012, claimed only by its own delivery).
    queue: Mapped[str | None] = mapped_column(String(255))
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # When the job last entered the queue: its submit, a continue, or an attempt that went back
    # (a shutdown, a lost attempt). Each attempt row copies it: the queue wait is started - queued.
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Training speed measured at the latest metric point (for the ETA); null before the first.
    steps_per_s: Mapped[float | None] = mapped_column(Float)
    # DELETE /v1/jobs/{id}: the row is marked first (the job is gone for every reader), its files
    # removed, then its rows; a sweeper finishes a deletion that a crash interrupted.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    # When its metric points were thinned to DDPM_METRICS_RETENTION_POINTS (metric retention).
    metrics_downsampled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # How many times the job has ended (succeeded, failed, cancelled): a continue starts run
    # number runs_finished. Webhook event keys carry it, so each run's job.started and final
    # event are delivered once (app/webhooks/service.py), however many attempts the run takes.
    runs_finished: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    checkpoints: Mapped[list[Checkpoint]] = relationship(
        back_populates="job", lazy="raise", order_by="Checkpoint.step", passive_deletes=True
    )


DATASET_STATUSES = ("uploading", "preparing", "ready", "failed")


class Dataset(Base):
    """A user's data set: an uploaded archive or a source URI, prepared once by a worker into a
    content-addressed image set (worker/datasets/). uploading -> preparing -> ready | failed.

    Files live in the checkpoint store under `datasets/<id>/`: the upload while it arrives and
    until it is prepared (`archive_key`), then the prepared set (`prepared_key`, an uncompressed
    tar of the accepted images) and its preview grid. `sha256` (of the prepared tar) addresses the
    decoded arrays cached for jobs under `datasets/cache/<sha256>/`."""

    __tablename__ = "datasets"
    __table_args__ = (CheckConstraint(f"status IN {DATASET_STATUSES!r}", name="status_valid"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True, default="uploading")
    # "upload", or the URI it is read from: s3://bucket/prefix/, https://host/images.zip, hf://ns/name
    source: Mapped[str] = mapped_column(String(2048))
    split: Mapped[str | None] = mapped_column(String(100))  # hf:// only
    archive_format: Mapped[str | None] = mapped_column(String(8))  # zip | tar | tar.gz (uploads)
    archive_key: Mapped[str | None] = mapped_column(String(1024))
    received_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # of the upload, so far
    upload_length: Mapped[int | None] = mapped_column(BigInteger)  # declared total (Upload-Length)
    archive_sha256: Mapped[str | None] = mapped_column(String(64))  # of the whole upload
    # Storage the data set takes, counted against the owner's quota: the upload until it is
    # prepared, then the prepared set and its preview.
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    prepared_key: Mapped[str | None] = mapped_column(String(1024))
    sha256: Mapped[str | None] = mapped_column(String(64))  # of the prepared tar: the content address
    prepared_bytes: Mapped[int | None] = mapped_column(BigInteger)
    image_count: Mapped[int | None] = mapped_column(Integer)
    skipped: Mapped[int | None] = mapped_column(Integer)
    # {"sizes": [{"width", "height", "count"}], "modes": {mode: n}, "skipped_reasons": {reason: n},
    #  "skipped_examples": [{"name", "reason"}], "source_bytes": n, "seconds": s}
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    preview_key: Mapped[str | None] = mapped_column(String(1024))
    preview_sha256: Mapped[str | None] = mapped_column(String(64))
    preview_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The worker (host:pid) preparing it; the sweeper re-sends a preparation whose worker is gone.
    worker: Mapped[str | None] = mapped_column(String(255))
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    prepared_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class MetricPoint(Base):
    """The mean training loss over the `log_every` steps ending at `step`."""

    __tablename__ = "metric_points"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Null when every step of the window had a non-finite loss (and was skipped).
    loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    images_per_s: Mapped[float] = mapped_column(Float)
    # The mean loss per timestep range (worker/ddpm/sink.py LOSS_BUCKETS), null entries where no t
    # fell; null for points recorded before it was measured.
    loss_by_t: Mapped[list[float | None] | None] = mapped_column(JSON)
    # Model FLOP utilisation (0..1) over the window; null where the device's peak is not known
    # (the CPU) and for points recorded before it was measured.
    mfu: Mapped[float | None] = mapped_column(Float)
    # The most GPU memory the attempt's tensors had held by then; null on the CPU.
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobEvent(Base):
    """Something that happened to a run that its owner should know of (worker/ddpm/sink.py
    EventKind): an out-of-memory step redone with a smaller micro-batch, a compile that failed.
    An attempt writes at most MAX_EVENTS_PER_ATTEMPT of them (worker/database_sink.py)."""

    __tablename__ = "job_events"

    # Orders a job's events (the list's cursor, the live stream's id): a sequence, not a step,
    # since a resumed attempt re-does steps and one step can have several events.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))  # an EventKind value
    message: Mapped[str] = mapped_column(Text)  # one line for people
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)  # facts for programs (EventKind's doc)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class Evaluation(Base):
    """FID and KID of samples drawn from the EMA weights at `step`, against the training set."""

    __tablename__ = "evaluations"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    fid: Mapped[float] = mapped_column(Float)
    kid: Mapped[float] = mapped_column(Float)
    kid_std: Mapped[float] = mapped_column(Float)
    samples: Mapped[int] = mapped_column(Integer)
    reference_images: Mapped[int] = mapped_column(Integer)
    feature_network: Mapped[str] = mapped_column(String(64))
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Sample(Base):
    """A grid of samples drawn from the EMA weights at `step` (a PNG under the checkpoint root)."""

    __tablename__ = "samples"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))  # relative to the checkpoint root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SampleRequest(Base):
    """An on-demand draw from a checkpoint (POST /v1/jobs/{id}/sample), run by a worker."""

    __tablename__ = "sample_requests"
    __table_args__ = (CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed')", name="status_valid"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    checkpoint_step: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    sampler: Mapped[str] = mapped_column(String(8))
    steps: Mapped[int] = mapped_column(Integer)  # network calls: T for ddpm, as asked for ddim
    status: Mapped[str] = mapped_column(String(16), default="queued")
    error: Mapped[str | None] = mapped_column(Text)
    png_path: Mapped[str | None] = mapped_column(String(1024))
    png_sha256: Mapped[str | None] = mapped_column(String(64))
    npz_path: Mapped[str | None] = mapped_column(String(1024))
    npz_sha256: Mapped[str | None] = mapped_column(String(64))
    # The worker (host:pid) drawing a running request: if it stops checking in (workers table),
    # the sweeper puts the request back in the queue.
    worker: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the task was last handed to the broker (None: not yet, or sending failed), as for jobs.
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Checkpoint(Base):
    """A committed checkpoint: the row exists only once its file is whole (invariant 3)."""

    __tablename__ = "checkpoints"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Relative to the checkpoint root, never taken from a request.
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # The resume state beside the weights (never served).
    state_path: Mapped[str] = mapped_column(String(1024))
    # Seconds from the snapshot to the files being stored (written, and uploaded with S3).
    write_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(back_populates="checkpoints", lazy="raise")


class Worker(Base):
    """A live worker and what it offers, written by its sweeper every pass (app/routing.py).

    Routing itself is Celery's (a worker consumes only the queues of jobs it can hold); this table
    is how the API explains a job that no running worker can hold."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid, as jobs.worker
    queue: Mapped[str] = mapped_column(String(255))  # DDPM_QUEUE, the base of its queue names
    gpus: Mapped[int] = mapped_column(Integer)
    gpu_memory_gb: Mapped[float] = mapped_column(Float)
    device: Mapped[str] = mapped_column(String(64))  # "cuda" or "cpu"
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class JobLogLine(Base):
    """One log record of a job's attempt, as the worker's console showed it (worker/job_log.py).
    `seq` orders an attempt's lines; an attempt keeps at most DDPM_JOB_LOG_MAX_LINES of them."""

    __tablename__ = "job_log_lines"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)  # when the record was made, not written
    level: Mapped[str] = mapped_column(String(16))  # INFO, WARNING, ERROR, ...
    logger: Mapped[str] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text)  # the formatted message, a traceback included


class JobAttempt(Base):
    """One attempt of a job: who ran it, on what, and for how long: the basis of GPU-seconds
    (GET /v1/usage). It outlives its job (job_id is set null when the job is deleted), so usage
    stays true after a clean-up."""

    __tablename__ = "job_attempts"
    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_job_attempts_job_id_attempt"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(255))
    device: Mapped[str] = mapped_column(String(16))  # "cuda" or "cpu"
    gpus: Mapped[int] = mapped_column(Integer)  # resources.gpus: processes on a CPU worker
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # jobs.queued_at at the claim
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # Renewed with the lease: a worker killed mid-attempt is counted up to its last heartbeat.
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # succeeded | failed | cancelled | requeued | lost; null while it runs
    outcome: Mapped[str | None] = mapped_column(String(16))


WEBHOOK_EVENTS = (
    "job.started",
    "job.checkpoint",
    "job.sample",
    "job.evaluation",
    "job.succeeded",
    "job.failed",
    "job.cancelled",
)
DELIVERY_STATUSES = ("pending", "succeeded", "failed")


class Webhook(Base):
    """A user's endpoint, told about their jobs' events (app/webhooks/). Deliveries are signed the
    Standard Webhooks way with `secret` (whsec_ + base64 of 32 random bytes), shown once."""

    __tablename__ = "webhooks"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON)  # a subset of WEBHOOK_EVENTS
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """One event for one endpoint: inserted in the transaction that commits the event's row (so it
    exists exactly when the event happened), sent later by a worker's delivery thread, retried with
    backoff until it succeeds or `DDPM_WEBHOOK_RETRY_FOR_S` has passed. `event_key` (the event's
    identity, e.g. `job.checkpoint:<job>:<step>`) is unique per endpoint, so an event re-done by a
    resumed attempt is not delivered twice. The id is the `webhook-id` header of every try."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "event_key", name="uq_webhook_deliveries_webhook_id_event_key"),
        CheckConstraint(f"status IN {DELIVERY_STATUSES!r}", name="status_valid"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    webhook_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    event: Mapped[str] = mapped_column(String(32))
    event_key: Mapped[str] = mapped_column(String(255))
    job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)  # not a key: deliveries outlive jobs
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # A sender holds a delivery until this time while it tries it (a killed sender's hold expires).
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookAttempt(Base):
    """One try of a delivery: the receiver's status code, or why there was none."""

    __tablename__ = "webhook_attempts"

    delivery_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True
    )
    number: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1, 2, ...
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    seconds: Mapped[float] = mapped_column(Float)
