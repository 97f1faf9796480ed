"""One attempt of a job on this worker: claimed, trained under its lease, and ended.

run(job_id) (worker/runner.py):
  claim the row (queued -> running, attempt + 1; a conditional update, so one runner wins)
  -> resume from the latest committed checkpoint, if any; files no row names are garbage, removed
  -> a job on a user's data set: its decoded images on this host (worker/datasets/cache.py:
     reused, fetched or decoded once, under a heartbeat); a data set deleted meanwhile fails it
  -> train, with a sink (worker/database_sink.py) that writes metric points, checkpoint rows and
     heartbeats, each fenced by the attempt number (worker/lease.py): a newer attempt stops this
     one without another write. A multi-GPU job trains in one process per rank
     (worker/ranks.py); rank 0 runs the attempt as a single-GPU worker does.
  -> final status: succeeded, cancelled (cancel requested; a checkpoint of the step it stopped
     at is kept) or failed (with the reason); re-queued when the worker shuts down (checkpoint
     first; a stop does not count against DDPM_MAX_ATTEMPTS); a lost attempt (lease, storage, a rank) is resumed
     by a new one.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.checkpoints.repository import CheckpointRepository
from app.checkpoints.store import CheckpointFileError, StorageUnavailable, make_store
from app.config import Settings
from app.datasets.repository import DatasetRepository
from app.db import make_engine, make_sessionmaker, session_scope
from app.evaluations.repository import EvaluationRepository
from app.jobs import scheduling
from app.jobs import service as jobs
from app.jobs.data_roots import resolve_dataset_folder
from app.jobs.repository import JobRepository
from app.log_format import bind_log
from app.models import JobStatus, utcnow
from app.queue import Dispatcher, Task, send_after_commit
from app.routing import train_queue
from app.samples.repository import SampleRepository
from app.spec import JobSpec
from app.usage.repository import REQUEUED, AttemptRepository
from app.webhooks import service as webhooks
from worker.capacity import device_type, worker_name
from worker.database_sink import DatabaseSink, finite_or_none, remove_files
from worker.datasets.cache import TrainingImagesError, training_images
from worker.ddpm.evaluation.cache import EvaluationSetup
from worker.ddpm.sink import StopReason
from worker.evaluation_cache import StoreCache
from worker.init_from import SourceCheckpoint
from worker.job_log import capture_job_log
from worker.lease import Lease
from worker.shutdown import stop_consuming

if TYPE_CHECKING:  # torch: the Celery worker and the sweeper start without it
    from worker.ddpm.distributed import Ranks

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ClaimedAttempt:
    """What a claim hands to training (and, pickled, to each rank's process)."""

    job_id: uuid.UUID
    attempt: int
    spec: JobSpec
    resume_from: Path | None  # the weights of the latest committed checkpoint, the state beside them
    cancel_requested: bool
    images: Path | None = None  # a `dataset` job's decoded training set on this host (worker/datasets/cache.py)
    unusable: str | None = None  # why this attempt cannot train (its data set was deleted...): it fails with it
    init_from: Path | None = None  # a fine-tune's first attempt: its source checkpoint's training state


@dataclass(frozen=True)
class PreparedSet:
    """A `dataset` job's data set as its row says at claim: where its prepared images are."""

    dataset_id: str
    sha256: str
    key: str

    @classmethod
    def of(cls, session: Session, spec: JobSpec) -> PreparedSet | str | None:
        """The job's prepared set; a reason it cannot train on it (deleted, not ready); None for other kinds."""
        dataset_id = spec.dataset.id
        if spec.dataset.kind != "dataset" or dataset_id is None:
            return None
        row = DatasetRepository(session).get(uuid.UUID(dataset_id))
        if row is None:
            return f"data set {dataset_id} was deleted"
        if row.status != "ready" or row.sha256 is None or row.prepared_key is None:
            return f"data set {dataset_id} is {row.status}, not ready to train on"
        return cls(dataset_id, row.sha256, row.prepared_key)


class AttemptRunner:
    """Claims, trains and ends attempts of jobs, on this worker's database, store and settings."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self.sessionmaker = factory or make_sessionmaker(make_engine(settings))
        self.store = make_store(settings)  # the local root is where training writes, in any case
        self.worker_name = worker_name()
        self.dispatcher = Dispatcher(settings)  # re-queued jobs are sent through it after commit

    @functools.cached_property
    def device_type(self) -> str:
        """The device type this worker trains on, recorded with each attempt (job_attempts.device)."""
        return device_type(self.settings)

    # --- claim ----------------------------------------------------------------------------
    def claim(self, job_id: uuid.UUID) -> ClaimedAttempt | None:
        """A new attempt of the next job of `job_id`'s queue (a delivery is a turn of its queue:
        app/jobs/scheduling.py), ready to train; None when no job there can start."""
        result = self.retry_db(lambda: self._claim(job_id))
        if result is None:
            return None
        claimed, committed, prepared = result
        job_id = claimed.job_id  # the turn may have gone to another job of the queue
        bind_log(job_id=job_id, attempt=claimed.attempt)
        log.info(
            "job %s: attempt %d claimed by %s (resume from %s)",
            job_id,
            claimed.attempt,
            self.worker_name,
            claimed.resume_from,
        )
        self._collect_garbage(job_id, committed)
        if prepared is None or claimed.cancel_requested or claimed.unusable:  # no data set, or ending at once
            return claimed
        if isinstance(prepared, str):
            return dataclasses.replace(claimed, unusable=prepared)
        return self._with_training_images(claimed, prepared)

    def _claim(self, job_id: uuid.UUID) -> tuple[ClaimedAttempt, set[str], PreparedSet | str | None] | None:
        with session_scope(self.sessionmaker) as session:
            repo = JobRepository(session)
            cap = self.settings.max_running_gpus_per_user
            taken = scheduling.claim_turn(session, job_id, self.worker_name, cap)
            if taken is None:
                log.info("delivery of job %s: no job of its queue can start now; nothing to do", job_id)
                return None
            job_id, attempt = taken
            job = repo.get(job_id)
            assert job is not None
            rows = CheckpointRepository(session).list(job_id)
            latest = rows[-1] if rows else None
            resume_step = latest.step if latest else 0
            # The steps after the checkpoint are re-done by this attempt: their old points, grids
            # and evaluations go (the grids' files become garbage, collected by claim()).
            repo.drop_metrics_after(job_id, resume_step)
            samples = SampleRepository(session).drop_after(job_id, resume_step)
            EvaluationRepository(session).drop_after(job_id, resume_step)
            repo.fenced_update(job_id, attempt, step=resume_step, steps_per_s=None)  # measured anew (ETA)
            webhooks.record_job_started(session, job, attempt, resume_step)  # once per run
            resume_keys = (latest.state_path, latest.path) if latest else None
            committed = {path for row in rows for path in (row.path, row.state_path)}
            committed |= {sample.path for sample in samples}
            spec, cancel_requested = JobSpec.model_validate(job.spec), job.cancel_requested
            AttemptRepository(session).start(
                job, attempt, worker=self.worker_name, device=self.device_type, gpus=spec.resources.gpus
            )
            prepared = PreparedSet.of(session, spec)
            source = SourceCheckpoint.of(session, spec) if latest is None else None  # a fine-tune's start
        # Committed: the claim is ours. Fetch the files to resume from (S3: downloaded into the
        # checkpoint root unless this host still has them). If the store is away this raises, the
        # lease runs out and the sweeper hands the job to another attempt.
        resume_from = self._resume_files(job_id, *resume_keys) if resume_keys else None
        claimed = ClaimedAttempt(job_id, attempt, spec, resume_from, cancel_requested)
        return self._with_source(claimed, source), committed, prepared

    def _with_source(self, claimed: ClaimedAttempt, source: SourceCheckpoint | str | None) -> ClaimedAttempt:
        """A fine-tune's first attempt with its source checkpoint's training state on this host
        (worker/init_from.py), or unusable when the source is gone."""
        if source is None or claimed.cancel_requested:
            return claimed
        found = source if isinstance(source, str) else source.fetch(self.store)
        if isinstance(found, str):
            log.error("job %s: %s", claimed.job_id, found)
            return dataclasses.replace(claimed, unusable=found)
        return dataclasses.replace(claimed, init_from=found)

    def _with_training_images(self, claimed: ClaimedAttempt, prepared: PreparedSet) -> ClaimedAttempt:
        """The claim with its data set's decoded images on this host (decoding 50,000 images takes
        a while: the lease is renewed meanwhile). A prepared set missing or damaged in storage
        makes the attempt unusable; a store that does not answer raises, as for resume files."""
        lease = Lease(claimed.job_id, claimed.attempt, self.settings.lease_timeout_s)
        data = claimed.spec.dataset
        try:
            with lease.heartbeat(self.sessionmaker, self.settings.heartbeat_interval_s):
                images = training_images(self.store, prepared.sha256, prepared.key, data.image_size, data.channels)
        except TrainingImagesError as exc:
            log.error("job %s: data set %s cannot be trained on: %s", claimed.job_id, prepared.dataset_id, exc)
            return dataclasses.replace(claimed, unusable=f"data set {prepared.dataset_id}: {exc}")
        return dataclasses.replace(claimed, images=images)

    def _resume_files(self, job_id: uuid.UUID, state_key: str, weights_key: str) -> Path:
        """The weights file to resume from, with its training state beside it."""
        try:
            self.store.resume_copy(state_key)
            return self.store.resume_copy(weights_key)
        except CheckpointFileError as exc:
            # The trainer fails the job, naming the file it cannot read.
            log.error("job %s: cannot fetch the checkpoint to resume from: %s", job_id, exc)
            return self.store.resolve(weights_key)

    def _collect_garbage(self, job_id: uuid.UUID, committed: set[str]) -> None:
        """Files of earlier attempts that no row points at (a write cut short by a crash, a
        checkpoint whose row never committed) are garbage (invariant 3): delete them, in the
        store and in this host's scratch. Claimed attempts are fenced, so no live writer can
        still need them."""
        try:
            garbage = sorted(self.store.keys_under(f"{job_id}/") - committed)
        except StorageUnavailable as exc:
            log.warning("job %s: garbage not collected this time (%s)", job_id, exc)
            return
        for key in garbage:
            log.info("job %s: removing %s (no checkpoint row points at it)", job_id, key)
        remove_files(self.store, job_id, garbage)

    # --- train ----------------------------------------------------------------------------
    def train(self, claimed: ClaimedAttempt, ranks: Ranks | None = None) -> str:
        """Train a claimed attempt here, holding its lease (in rank 0's process for a multi-GPU job)."""
        bind_log(job_id=claimed.job_id, attempt=claimed.attempt)  # a rank's process binds here
        lease = Lease(claimed.job_id, claimed.attempt, self.settings.lease_timeout_s)
        training = claimed.spec.training
        sink = DatabaseSink(
            self.sessionmaker, self.store, lease, training.keep_checkpoints, training.keep_best, training.batch_size
        )
        job_log = capture_job_log(self.sessionmaker, claimed.job_id, claimed.attempt, self.settings.job_log_max_lines)
        with job_log:
            with lease.heartbeat(self.sessionmaker, self.settings.heartbeat_interval_s):
                outcome = self._train(claimed, sink, ranks)
            if outcome == "shutdown":
                # The heartbeat has stopped and the checkpoint writer is closed: nothing of this
                # attempt writes once the row is handed back.
                self._requeue(claimed.job_id, claimed.attempt, claimed.spec)
                return "requeued"
            return outcome

    def _train(self, claimed: ClaimedAttempt, sink: DatabaseSink, ranks: Ranks | None) -> str:
        from worker.ddpm.distributed import is_peer_loss
        from worker.ddpm.trainer import train

        job_id, attempt, spec = claimed.job_id, claimed.attempt, claimed.spec
        try:
            spec = self.resolved_dataset(spec)
            job_dir, device = self.job_dir(job_id, attempt), self.device(ranks)
            result = train(
                spec,
                job_dir,
                sink,
                resume_from=claimed.resume_from,
                init_from=claimed.init_from,
                device=device,
                ranks=ranks,
                images_file=claimed.images,
                evaluation=self.evaluation_setup(),
                peak_flops=self.settings.peak_tflops * 1e12 if self.settings.peak_tflops else None,
            )
        except Exception as exc:
            if ranks is not None and is_peer_loss(exc):
                # Another rank is gone (killed, crashed): not this job's fault. The supervising
                # worker sees which rank failed and hands the job to a new attempt.
                raise
            reason = describe_failure(exc, spec)
            log.exception("job %s: attempt %d failed: %s", job_id, attempt, reason)
            self.finish(job_id, attempt, status=JobStatus.failed, error=reason)
            return "failed"
        if result.stopped is StopReason.fenced:
            log.warning("job %s: attempt %d fenced off by a newer attempt; stopped", job_id, attempt)
            return "fenced"
        if result.stopped is StopReason.cancelled:
            self.finish(job_id, attempt, status=JobStatus.cancelled)
            return "cancelled"
        if result.stopped is StopReason.shutdown:
            return "shutdown"  # re-queued by train(), once the heartbeat has stopped
        if result.stopped is not None:  # lease_lost, storage_unavailable: the sweeper hands it on
            why = "lost its lease" if result.stopped is StopReason.lease_lost else "could not store a checkpoint"
            log.warning("job %s: attempt %d %s; the job will be resumed", job_id, attempt, why)
            return "lease-lost"
        self.finish(
            job_id, attempt, status=JobStatus.succeeded, step=result.final_step, loss=finite_or_none(result.last_loss)
        )
        return "succeeded"

    def evaluation_setup(self) -> EvaluationSetup:
        """FID/KID's cache (the store, shared by every worker) and this worker's Inception weights."""
        return EvaluationSetup(StoreCache(self.store), self.settings.fid_weights, self.settings.fid_weights_sha256)

    def job_dir(self, job_id: uuid.UUID, attempt: int) -> Path:
        # One folder per attempt: a stale attempt that has not yet noticed it was fenced off can
        # never replace a file that a newer attempt committed under the same step.
        job_dir = self.settings.checkpoint_root / str(job_id) / f"attempt-{attempt}"
        job_dir.mkdir(parents=True, exist_ok=True)
        return job_dir

    def device(self, ranks: Ranks | None = None) -> str | None:
        """The device to train on: the setting, CUDA when there is one ("auto"); a rank's own GPU."""
        from worker.ddpm.trainer import resolve_device

        device = None if self.settings.device == "auto" else self.settings.device
        return str(ranks.device(resolve_device(device).type)) if ranks is not None else device

    def resolved_dataset(self, spec: JobSpec) -> JobSpec:
        if spec.dataset.kind != "folder":
            return spec
        # Again on the worker (a symlink may have changed since the API checked), and so a
        # relative path means the same here as there: under the first data root.
        folder = resolve_dataset_folder(spec.dataset.path or "", self.settings.data_roots)
        return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"path": str(folder)})})

    # --- end ------------------------------------------------------------------------------
    def finish(self, job_id: uuid.UUID, attempt: int, *, status: JobStatus, **values: object) -> None:
        """The attempt's final status, written only while it is still the job's current one; its
        GPUs are free, so a waiting job of its queue gets a turn (app/jobs/scheduling.py)."""

        def write() -> None:
            with session_scope(self.sessionmaker) as session:
                now, repo = utcnow(), JobRepository(session)
                if not repo.fenced_update(job_id, attempt, status=status, finished_at=now, heartbeat_at=now, **values):
                    log.warning("job %s: attempt %d fenced off; final status %s not written", job_id, attempt, status)
                    return
                AttemptRepository(session).end(job_id, attempt, status.value, now)
                job = repo.get(job_id)
                assert job is not None
                webhooks.record_job_end(session, job)  # committed with the status
                self._send_next_turn(session, job_id)

        self.retry_db(write)
        log.info("job %s: attempt %d ended %s", job_id, attempt, status.value)

    def _requeue(self, job_id: uuid.UUID, attempt: int, spec: JobSpec) -> None:
        """running -> queued after a graceful stop (its checkpoint is committed), and sent again
        so a worker resumes it (if the broker is away, the sweeper sends it later).

        This worker stops consuming first, so it cannot take the job back on its way out. The
        stop is counted in `jobs.stops`, not as a lost attempt: restarts never use up
        DDPM_MAX_ATTEMPTS. The next claim is a new attempt as ever, so attempt numbers stay
        unique (fencing tokens, checkpoint folders, log lines)."""
        stop_consuming()

        def write() -> bool:
            with session_scope(self.sessionmaker) as session:
                now = utcnow()  # the attempt ends when the job is back in the queue
                requeued = JobRepository(session).requeue_for_shutdown(job_id, attempt, now)
                if requeued:
                    AttemptRepository(session).end(job_id, attempt, REQUEUED, now)
                    self._send_after_commit(session, job_id, spec)
                return requeued

        if self.retry_db(write):
            log.info("job %s: attempt %d checkpointed and re-queued for shutdown", job_id, attempt)

    def release_lost(self, job_id: uuid.UUID, attempt: int, spec: JobSpec, reason: str) -> str:
        """A lost attempt (as the sweeper treats an expired lease, at once): back to the queue and
        sent, or failed once the job has used `max_attempts`, or cancelled if asked to be."""

        def write() -> JobStatus | None:
            with session_scope(self.sessionmaker) as session:
                status = jobs.release_lost(session, job_id, attempt, self.settings.max_attempts, reason)
                if status is JobStatus.queued:
                    self._send_after_commit(session, job_id, spec)
                elif status is not None:  # failed or cancelled: its GPUs are free
                    self._send_next_turn(session, job_id)
                return status

        status = self.retry_db(write)
        if status is None:  # the attempt had already ended (or been fenced off)
            log.info("job %s: attempt %d is over; %s", job_id, attempt, reason)
            return "over"
        log.warning("job %s: attempt %d lost: %s; the job is %s", job_id, attempt, reason, status.value)
        return f"lost ({status.value})"

    def _send_after_commit(self, session: Session, job_id: uuid.UUID, spec: JobSpec) -> None:
        """Hand a re-queued job to the broker once its row commits, on the queue of workers that
        can hold it (if the broker is away, the sweeper sends it later)."""
        send_after_commit(session, self.dispatcher, Task.train(job_id, train_queue(self.settings.queue, spec)))

    def _send_next_turn(self, session: Session, ended: uuid.UUID) -> None:
        scheduling.send_next_turn(session, self.dispatcher, ended, self.settings.max_running_gpus_per_user)

    def retry_db(self, fn: Callable[[], T]) -> T:
        """Retry a short database step while the database is away, up to the lease timeout."""
        deadline = time.monotonic() + self.settings.lease_timeout_s
        delay = 0.5
        while True:
            try:
                return fn()
            except DBAPIError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("database unavailable (%s); retrying in %.1fs", exc.orig, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


def describe_failure(exc: BaseException, spec: JobSpec) -> str:
    """A reason a user can act on, stored in the job's `error`."""
    from worker.ddpm.step import StepOutOfMemoryError

    if isinstance(exc, StepOutOfMemoryError):  # names the micro-batches tried and what to change
        return str(exc)
    if "out of memory" in str(exc).lower():
        return (
            f"out of GPU memory with batch_size={spec.training.batch_size} and "
            f"image_size={spec.dataset.image_size}: lower training.batch_size or use a smaller model"
        )
    return f"{type(exc).__name__}: {exc}"
