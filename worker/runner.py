"""The runner ties one job's database row to the ML core's training loop.

run(job_id):
  claim the row (queued -> running, attempt + 1; a conditional update, so one runner wins)
  -> resume from the latest committed checkpoint, if any
  -> train, with a sink that writes metric points, checkpoint rows and heartbeats, each fenced
     by the attempt number (a newer attempt stops this one without another write)
  -> final status: succeeded, cancelled (cancel requested) or failed (with the reason).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.checkpoints.repository import CheckpointRepository
from app.checkpoints.store import CheckpointFileError, CheckpointStore, StorageUnavailable, make_store
from app.config import Settings, get_settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.jobs.data_roots import resolve_dataset_folder
from app.jobs.repository import JobRepository
from app.jobs.service import release_lost
from app.models import Checkpoint, Job, JobStatus, MetricPoint, Sample, SampleRequest, utcnow
from app.queue import Dispatcher
from app.routing import train_queue
from app.samples.repository import SampleRepository
from app.spec import JobSpec
from worker.capacity import worker_name
from worker.ddpm.sink import MetricPoint as TrainedPoint
from worker.ddpm.sink import NullSink, SavedCheckpoint, SavedSample, StopReason, StopTraining

if TYPE_CHECKING:
    from worker.ddpm.distributed import Ranks

log = logging.getLogger(__name__)
T = TypeVar("T")


# Set when the worker receives SIGTERM (celery's worker_shutting_down): the running job saves a
# checkpoint at its next log point and goes back to the queue, inside the stop grace period.
_SHUTDOWN = threading.Event()


def request_shutdown() -> None:
    _SHUTDOWN.set()


def _finite_or_none(value: float | None) -> float | None:
    """A window in which every step was skipped has a NaN mean: stored as null (JSON has no NaN)."""
    return value if value is not None and math.isfinite(value) else None


def _remove_files(store: CheckpointStore, job_id: uuid.UUID, keys: list[str]) -> None:
    """Delete files that no row names (any more). If the store is away they stay behind as
    garbage, which a later attempt of the job collects; training is not stopped for it."""
    for key in keys:
        try:
            store.delete(key)
        except StorageUnavailable as exc:
            log.warning("job %s: %s left in storage (%s)", job_id, key, exc)


@dataclass
class _Lease:
    """Shared between the training thread and the heartbeat thread."""

    renewed_at: float = field(default_factory=time.monotonic)
    fenced: bool = False
    stop: threading.Event = field(default_factory=threading.Event)


class DatabaseSink:
    """The ML core's TrainingSink, writing under one attempt number."""

    def __init__(self, runner: JobRunner, job_id: uuid.UUID, attempt: int, lease: _Lease, keep: int) -> None:
        self.runner = runner
        self.job_id = job_id
        self.attempt = attempt
        self.lease = lease
        self.keep = keep
        self.cancel_requested = False
        # Points not yet written (the database was briefly away); written with the next batch.
        self._pending: list[TrainedPoint] = []

    def _check_lease(self) -> None:
        if self.lease.fenced:
            raise StopTraining(StopReason.fenced, "a newer attempt owns this job")
        if time.monotonic() - self.lease.renewed_at > self.runner.settings.lease_timeout_s * 0.8:
            # Stop before the lease expires rather than train on unrecorded.
            raise StopTraining(StopReason.lease_lost, "could not renew the lease")

    def on_log(self, point: TrainedPoint) -> None:
        self._pending.append(point)
        try:
            with session_scope(self.runner.sessionmaker) as session:
                repo = JobRepository(session)
                if not repo.fenced_update(
                    self.job_id, self.attempt, step=point.step, loss=_finite_or_none(point.loss), heartbeat_at=utcnow()
                ):
                    self.lease.fenced = True
                    raise StopTraining(StopReason.fenced, "a newer attempt owns this job")
                repo.add_metric_points(
                    [
                        MetricPoint(
                            job_id=self.job_id,
                            step=p.step,
                            loss=_finite_or_none(p.loss),
                            lr=p.lr,
                            images_per_s=p.images_per_s,
                        )
                        for p in self._pending
                    ]
                )
                self.cancel_requested = repo.is_cancel_requested(self.job_id)
            self._pending = []
            self.lease.renewed_at = time.monotonic()
        except DBAPIError as exc:
            # Kept in _pending and written with the next point; if the database stays away,
            # _check_lease stops training before the lease runs out.
            log.warning("job %s: metrics at step %d not written yet (%s)", self.job_id, point.step, exc.orig)
        if self.cancel_requested:
            raise StopTraining(StopReason.cancelled)
        self._check_lease()
        if _SHUTDOWN.is_set():
            raise StopTraining(StopReason.shutdown, "the worker is shutting down")

    def on_sample(self, saved: SavedSample) -> None:
        store = self.runner.store
        try:
            key = store.publish(saved.path, saved.sha256)  # before its row (invariant 3)
        except StorageUnavailable as exc:  # a grid is a convenience: training goes on without it
            log.warning("job %s: sample grid at step %d not stored (%s)", self.job_id, saved.step, exc)
            return
        try:
            with session_scope(self.runner.sessionmaker) as session:
                if not JobRepository(session).fenced_update(self.job_id, self.attempt, heartbeat_at=utcnow()):
                    self.lease.fenced = True
                    raise StopTraining(StopReason.fenced, "a newer attempt owns this job")
                SampleRepository(session).add(
                    Sample(
                        job_id=self.job_id,
                        step=saved.step,
                        path=key,
                        size_bytes=saved.size_bytes,
                        sha256=saved.sha256,
                    )
                )
        except DBAPIError as exc:  # a grid is a convenience: training goes on without it
            log.warning("job %s: sample grid at step %d not recorded (%s)", self.job_id, saved.step, exc.orig)
            self._check_lease()
            return
        store.discard_scratch(key)

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        store = self.runner.store
        try:
            # Stored whole before the row that names it (invariant 3); S3: uploaded here.
            keys = [store.publish(saved.state_path), store.publish(saved.path, saved.sha256)]
        except StorageUnavailable as exc:
            # Without its files there is no checkpoint to record. Stop without finishing: the
            # lease runs out and the sweeper hands the job to a new attempt, which resumes from
            # the last recorded checkpoint (and removes these files as garbage).
            log.warning("job %s: checkpoint at step %d not stored (%s)", self.job_id, saved.step, exc)
            raise StopTraining(StopReason.storage_unavailable, str(exc)) from exc
        state_key, weights_key = keys
        try:
            with session_scope(self.runner.sessionmaker) as session:
                # The fenced update takes the row lock, so a concurrent claim cannot slip between
                # the check and the insert; the committed row is the checkpoint's commit point.
                if not JobRepository(session).fenced_update(self.job_id, self.attempt, heartbeat_at=utcnow()):
                    self.lease.fenced = True
                    raise StopTraining(StopReason.fenced, "a newer attempt owns this job")
                repo = CheckpointRepository(session)
                repo.add(
                    Checkpoint(
                        job_id=self.job_id,
                        step=saved.step,
                        path=weights_key,
                        size_bytes=saved.size_bytes,
                        sha256=saved.sha256,
                        state_path=state_key,
                    )
                )
                session.flush()
                removed = repo.remove_older_than_newest(self.job_id, self.keep)
        except StopTraining:
            # Rolled back, so never recorded: this attempt's own files are garbage now (the newer
            # attempt's garbage collection may have run before they were stored).
            _remove_files(store, self.job_id, keys)
            raise
        except DBAPIError as exc:
            # Not committed, so not a checkpoint: its files are garbage that the next attempt
            # removes. Training goes on; the next checkpoint is recorded if the database is back,
            # and the lease check stops us before the lease runs out if it is not.
            log.warning("job %s: checkpoint at step %d not recorded (%s)", self.job_id, saved.step, exc.orig)
            self._check_lease()
            return
        for key in keys:
            store.discard_scratch(key)
        # Files go only after their rows are gone (committed above).
        _remove_files(store, self.job_id, [key for old in removed for key in (old.path, old.state_path)])
        self.lease.renewed_at = time.monotonic()


class JobRunner:
    def __init__(self, settings: Settings, factory: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self.sessionmaker = factory or make_sessionmaker(make_engine(settings))
        self.store = make_store(settings)  # the local root is where training writes, in any case
        self.worker_name = worker_name()

    # --- the whole life of one attempt ----------------------------------------------------
    def run(self, job_id: uuid.UUID) -> str:
        claimed = self._retry_db(lambda: self._claim(job_id))
        if claimed is None:
            return "skipped"
        attempt, spec, resume_from, cancel_requested, committed = claimed
        log.info("job %s: attempt %d claimed by %s (resume from %s)", job_id, attempt, self.worker_name, resume_from)
        self._collect_garbage(job_id, committed)
        if cancel_requested:
            self._finish(job_id, attempt, status=JobStatus.cancelled)
            return "cancelled"
        if spec.resources.gpus > 1:
            return self._run_ranks(job_id, attempt, spec, resume_from)
        return self._attempt(job_id, attempt, spec, resume_from)

    def _attempt(
        self, job_id: uuid.UUID, attempt: int, spec: JobSpec, resume_from: Path | None, ranks: Ranks | None = None
    ) -> str:
        """Train one claimed attempt here, holding its lease (in rank 0's process for a multi-GPU job)."""
        lease = _Lease()
        sink = DatabaseSink(self, job_id, attempt, lease, keep=spec.training.keep_checkpoints)
        heartbeat = threading.Thread(target=self._heartbeat, args=(job_id, attempt, lease), daemon=True)
        heartbeat.start()
        try:
            return self._train(job_id, attempt, spec, resume_from, sink, lease, ranks)
        finally:
            lease.stop.set()
            heartbeat.join(timeout=5)

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

    def _train(
        self,
        job_id: uuid.UUID,
        attempt: int,
        spec: JobSpec,
        resume_from: Path | None,
        sink: DatabaseSink,
        lease: _Lease,
        ranks: Ranks | None = None,
    ) -> str:
        from worker.ddpm.distributed import is_peer_loss
        from worker.ddpm.trainer import train

        try:
            spec = self.resolved_dataset(spec)
            job_dir, device = self.job_dir(job_id, attempt), self.device(ranks)
            result = train(spec, job_dir, sink, resume_from=resume_from, device=device, ranks=ranks)
        except Exception as exc:
            if ranks is not None and is_peer_loss(exc):
                # Another rank is gone (killed, crashed): not this job's fault. The supervising
                # worker sees which rank failed and hands the job to a new attempt.
                raise
            reason = describe_failure(exc, spec)
            log.exception("job %s: attempt %d failed: %s", job_id, attempt, reason)
            self._finish(job_id, attempt, status=JobStatus.failed, error=reason)
            return "failed"
        if result.stopped is StopReason.fenced:
            log.warning("job %s: attempt %d fenced off by a newer attempt; stopped", job_id, attempt)
            return "fenced"
        if result.stopped is StopReason.cancelled:
            self._finish(job_id, attempt, status=JobStatus.cancelled)
            return "cancelled"
        if result.stopped is StopReason.shutdown:
            self._requeue(job_id, attempt, spec)
            return "requeued"
        if result.stopped is not None:  # lease_lost, storage_unavailable: the sweeper hands it on
            log.warning("job %s: attempt %d stopped (%s); the job will be resumed", job_id, attempt, result.stopped)
            return "lease-lost"
        self._finish(
            job_id, attempt, status=JobStatus.succeeded, step=result.final_step, loss=_finite_or_none(result.last_loss)
        )
        return "succeeded"

    def resolved_dataset(self, spec: JobSpec) -> JobSpec:
        if spec.dataset.kind != "folder":
            return spec
        # Again on the worker (a symlink may have changed since the API checked), and so a
        # relative path means the same here as there: under the first data root.
        folder = resolve_dataset_folder(spec.dataset.path or "", self.settings.data_roots)
        return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"path": str(folder)})})

    # --- a multi-GPU job: one process per rank, supervised from here ----------------------------
    def _run_ranks(self, job_id: uuid.UUID, attempt: int, spec: JobSpec, resume_from: Path | None) -> str:
        """Train on `resources.gpus` processes (worker/ddpm/distributed.py). Rank 0 holds the lease and
        writes everything, as a single-GPU attempt does; this process only watches them. A rank that
        dies (killed, crashed) takes the others down, and the attempt is lost like a dead worker's:
        the job goes back to the queue and resumes from its latest checkpoint."""
        import multiprocessing

        from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

        from worker.ddpm.distributed import free_port, spawn_ranks

        world_size = spec.resources.gpus
        shutdown = multiprocessing.get_context("spawn").Event()
        init_method = f"tcp://127.0.0.1:{free_port()}"
        args = (self.settings, job_id, attempt, spec, resume_from, world_size, init_method, shutdown)
        ranks = spawn_ranks(_rank_main, args, world_size)
        log.info("job %s: attempt %d runs on %d ranks, pids %s", job_id, attempt, world_size, ranks.pids())
        rank0_done_at: float | None = None
        try:
            while not ranks.join(timeout=1.0, grace_period=10.0):
                if _SHUTDOWN.is_set():
                    shutdown.set()  # rank 0 checkpoints at its next log point and re-queues the job
                if ranks.processes[0].exitcode is not None:
                    # Rank 0 has ended the attempt; the others leave with it (a hung collective
                    # must not hold the GPUs).
                    rank0_done_at = rank0_done_at or time.monotonic()
                    if time.monotonic() - rank0_done_at > 30:
                        for process in ranks.processes[1:]:
                            process.kill()
        except ProcessException as exc:
            what = str(exc).strip().splitlines()[-1]  # "terminated with signal SIGKILL", or the error
            if isinstance(exc, ProcessExitedException):
                what = what.removeprefix(f"process {exc.error_index} ")
            return self._release_lost(job_id, attempt, spec, f"rank {exc.error_index} (pid {exc.error_pid}) {what}")

        def read_status() -> str:
            with session_scope(self.sessionmaker) as session:
                job = JobRepository(session).get(job_id)
                return job.status if job is not None else "missing"

        outcome = self._retry_db(read_status)
        if outcome == JobStatus.running:  # rank 0 stopped without an ending (lost its lease)
            return self._release_lost(job_id, attempt, spec, "rank 0 stopped without finishing the attempt")
        return str(outcome)

    def _release_lost(self, job_id: uuid.UUID, attempt: int, spec: JobSpec, reason: str) -> str:
        """A lost attempt (as the sweeper treats an expired lease, at once): back to the queue and
        sent, or failed once the job has used `max_attempts`, or cancelled if asked to be."""

        def write() -> JobStatus | None:
            with session_scope(self.sessionmaker) as session:
                return release_lost(session, job_id, attempt, self.settings.max_attempts, reason)

        status = self._retry_db(write)
        if status is None:  # the attempt had already ended (or been fenced off)
            log.info("job %s: attempt %d is over; %s", job_id, attempt, reason)
            return "over"
        log.warning("job %s: attempt %d lost: %s; the job is %s", job_id, attempt, reason, status.value)
        if status is JobStatus.queued:
            self._send(job_id, spec)
        return f"lost ({status.value})"

    # --- database steps -------------------------------------------------------------------
    def _claim(self, job_id: uuid.UUID) -> tuple[int, JobSpec, Path | None, bool, set[str]] | None:
        with session_scope(self.sessionmaker) as session:
            repo = JobRepository(session)
            attempt = repo.claim(job_id, self.worker_name)
            if attempt is None:
                job = repo.get(job_id)
                state = job.status if job else "missing"
                log.info("job %s is %s, not queued: nothing to do for this delivery", job_id, state)
                return None
            job = repo.get(job_id)
            assert job is not None
            rows = CheckpointRepository(session).list(job_id)
            latest = rows[-1] if rows else None
            resume_step = latest.step if latest else 0
            # The steps after the checkpoint are re-done by this attempt: their old points and
            # grids go (the grids' files become garbage, collected below).
            repo.drop_metrics_after(job_id, resume_step)
            samples = SampleRepository(session).drop_after(job_id, resume_step)
            repo.fenced_update(job_id, attempt, step=resume_step)
            resume_keys = (latest.state_path, latest.path) if latest else None
            committed = {path for row in rows for path in (row.path, row.state_path)}
            committed |= {sample.path for sample in samples}
            claimed = attempt, JobSpec.model_validate(job.spec), job.cancel_requested
        # Committed: the claim is ours. Fetch the files to resume from (S3: downloaded into the
        # checkpoint root unless this host still has them). If the store is away this raises, the
        # lease runs out and the sweeper hands the job to another attempt.
        resume_from = self._resume_files(job_id, *resume_keys) if resume_keys else None
        attempt, spec, cancel_requested = claimed
        return attempt, spec, resume_from, cancel_requested, committed

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
        _remove_files(self.store, job_id, garbage)

    def _finish(self, job_id: uuid.UUID, attempt: int, *, status: JobStatus, **values: object) -> None:
        def write() -> None:
            with session_scope(self.sessionmaker) as session:
                if not JobRepository(session).fenced_update(
                    job_id, attempt, status=status, finished_at=utcnow(), heartbeat_at=utcnow(), **values
                ):
                    log.warning("job %s: attempt %d fenced off; final status %s not written", job_id, attempt, status)

        self._retry_db(write)
        log.info("job %s: attempt %d ended %s", job_id, attempt, status.value)

    def _requeue(self, job_id: uuid.UUID, attempt: int, spec: JobSpec) -> None:
        """running -> queued after a graceful stop, and sent again so another worker resumes it
        (if the broker is away, the sweeper sends it later)."""

        def write() -> bool:
            with session_scope(self.sessionmaker) as session:
                return JobRepository(session).fenced_update(
                    job_id, attempt, status=JobStatus.queued, worker=None, dispatched_at=None
                )

        if not self._retry_db(write):
            return
        log.info("job %s: attempt %d checkpointed and re-queued for shutdown", job_id, attempt)
        self._send(job_id, spec)

    def _send(self, job_id: uuid.UUID, spec: JobSpec) -> None:
        """Hand a re-queued job to the broker, on the queue of workers that can hold it."""
        try:
            Dispatcher(self.settings).send_train(str(job_id), train_queue(self.settings.queue, spec))
        except Exception as exc:  # the sweeper re-sends jobs that were never sent
            log.warning("job %s: not re-sent now (%s); the sweeper will send it", job_id, exc)
            return
        with session_scope(self.sessionmaker) as session:
            JobRepository(session).mark_dispatched(job_id)

    def _heartbeat(self, job_id: uuid.UUID, attempt: int, lease: _Lease) -> None:
        """Renew the lease between log points (a slow step must not look like a dead worker)."""
        while not lease.stop.wait(self.settings.heartbeat_interval_s):
            try:
                with session_scope(self.sessionmaker) as session:
                    if not JobRepository(session).fenced_update(job_id, attempt, heartbeat_at=utcnow()):
                        lease.fenced = True
                        return
                lease.renewed_at = time.monotonic()
            except DBAPIError as exc:
                log.warning("job %s: heartbeat failed (%s)", job_id, exc.orig)

    def _retry_db(self, fn: Callable[[], T]) -> T:
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
    if "out of memory" in str(exc).lower():
        return (
            f"out of GPU memory with batch_size={spec.training.batch_size} and "
            f"image_size={spec.dataset.image_size}: lower training.batch_size or use a smaller model"
        )
    return f"{type(exc).__name__}: {exc}"


# How long a rank waits in a collective before it gives up on its peers. The other ranks wait there
# while rank 0 writes a checkpoint, uploads it (S3) or draws a sample grid, which can take minutes
# for a large network; a rank that dies is noticed at once by the supervising worker instead.
COLLECTIVE_TIMEOUT_S = 1800.0


def _rank_main(
    rank: int,
    settings: Settings,
    job_id: uuid.UUID,
    attempt: int,
    spec: JobSpec,
    resume_from: Path | None,
    world_size: int,
    init_method: str,
    shutdown: Any,  # a multiprocessing Event: the worker is shutting down
) -> None:
    """One rank of a multi-GPU attempt, in its own (spawned) process. Rank 0 runs the attempt as a
    single-GPU worker does (lease, heartbeat, every database write); the others only train."""
    import signal

    from worker.ddpm.distributed import Ranks, process_group
    from worker.ddpm.trainer import resolve_device, train

    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s: %(levelname)s/rank-{rank}] %(name)s: %(message)s")
    # SIGTERM to the whole process group (a terminal, a test harness) means the same as to the
    # worker: rank 0 checkpoints and re-queues at its next log point, and the others follow it.
    signal.signal(signal.SIGTERM, lambda *_: request_shutdown() if rank == 0 else None)
    runner = JobRunner(settings)
    ranks = Ranks(rank, world_size)
    device_type = resolve_device(runner.device()).type
    with process_group(ranks, device_type, init_method, timeout_s=COLLECTIVE_TIMEOUT_S):
        if ranks.is_main:
            threading.Thread(target=lambda: shutdown.wait() and request_shutdown(), daemon=True).start()
            runner._attempt(job_id, attempt, spec, resume_from, ranks)
        else:
            spec = runner.resolved_dataset(spec)
            job_dir, device = runner.job_dir(job_id, attempt), runner.device(ranks)
            train(spec, job_dir, NullSink(), resume_from=resume_from, device=device, ranks=ranks)


@lru_cache
def get_runner() -> JobRunner:
    return JobRunner(get_settings())


def draw_requested_samples(settings: Settings, factory: sessionmaker[Session], request_id: uuid.UUID) -> str:
    """Run one POST /v1/jobs/{id}/sample: load the checkpoint, draw, write a PNG grid and a .npz.

    Claimed with a conditional update, so a re-delivered task does nothing; the files go under
    the checkpoint root's sample-requests/ (outside any job's folder, which its runs tidy)."""
    import io

    import numpy as np

    from worker.ddpm.checkpoint import atomic_write, load_unet
    from worker.ddpm.data import to_uint8
    from worker.ddpm.sampling import sample_images, save_grid_png
    from worker.ddpm.trainer import resolve_device

    store = make_store(settings)
    with session_scope(factory) as session:
        claimed = session.execute(
            update(SampleRequest)
            .where(SampleRequest.id == request_id, SampleRequest.status == "queued")
            .values(status="running", worker=worker_name())
            .returning(SampleRequest.job_id, SampleRequest.checkpoint_step)
        ).one_or_none()
        if claimed is None:
            log.info("sample request %s is not queued: nothing to do for this delivery", request_id)
            return "skipped"
        job_id, step = claimed
        request = session.get(SampleRequest, request_id)
        checkpoint = CheckpointRepository(session).get(job_id, step)
        job = session.get(Job, job_id)
        session.expunge_all()

    def finish(**values: object) -> None:
        with session_scope(factory) as session:
            session.execute(
                update(SampleRequest).where(SampleRequest.id == request_id).values(finished_at=utcnow(), **values)
            )

    if checkpoint is None or job is None or request is None:
        finish(status="failed", error=f"the checkpoint at step {step} is gone (pruned by keep_checkpoints?)")
        return "failed"
    spec = JobSpec.model_validate(job.spec)
    try:
        device = resolve_device(None if settings.device == "auto" else settings.device)
        with store.local_copy(checkpoint.path, checkpoint.sha256, checkpoint.size_bytes) as weights:
            unet = load_unet(weights, device)
        images = sample_images(
            unet,
            spec,
            request.count,
            request.seed,
            device,
            sampler=request.sampler,  # type: ignore[arg-type]
            steps=request.steps,
        )
        out_dir = settings.checkpoint_root / "sample-requests" / str(request_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        png_sha = save_grid_png(images, out_dir / "grid.png")
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy())  # (N, H, W, C)
        npz_sha = atomic_write(out_dir / "images.npz", buffer.getvalue())
        png_key, npz_key = store.publish(out_dir / "grid.png", png_sha), store.publish(out_dir / "images.npz", npz_sha)
    except Exception as exc:
        log.exception("sample request %s failed", request_id)
        finish(status="failed", error=describe_failure(exc, spec))
        return "failed"
    finish(
        status="succeeded",
        png_path=png_key,
        png_sha256=png_sha,
        npz_path=npz_key,
        npz_sha256=npz_sha,
    )
    store.discard_scratch(png_key)
    store.discard_scratch(npz_key)
    return "succeeded"
