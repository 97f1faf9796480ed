"""The training loop's sink on a worker: what a running attempt records, and in which order.

Each report of the loop (worker/ddpm/sink.py) becomes rows, written through the attempt's lease
(worker/lease.py) so that a fenced-off attempt writes nothing more:
  on_log: the metric points (and the job's step, loss and steps/s), then the cancel, lease and
     shutdown checks;
  on_sample: the grid's file into the store, then its row;
  on_checkpoint: both files into the store, then the row (the checkpoint's commit point), then the
     rows and files of checkpoints older than `keep_checkpoints` (retention);
  on_evaluation: its row, then (with training.keep_best) retention again, since the evaluation of
     a step arrives after its checkpoint and may make another one the best;
  on_event: its job_events row (the API's live stream reads it from there), at most
     MAX_EVENTS_PER_ATTEMPT of them.
Retention keeps the newest `keep_checkpoints` and, with keep_best, the checkpoint whose evaluation
has the lowest FID (ties: the earliest step).
Files are stored whole before the row that names them, and deleted only after it is gone
(invariant 3). A database that is briefly away does not stop training; one that stays away does,
through the lease check, before the lease runs out.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.checkpoints.repository import CheckpointRepository
from app.checkpoints.store import CheckpointStore, StorageUnavailable
from app.db import session_scope
from app.evaluations.repository import EvaluationRepository
from app.job_events.repository import JobEventRepository
from app.jobs.repository import JobRepository
from app.models import Checkpoint, Evaluation, JobEvent, Sample
from app.models import MetricPoint as MetricRow
from app.samples.repository import SampleRepository
from app.webhooks import service as webhooks
from worker.ddpm.sink import (
    EvaluationPoint,
    MetricPoint,
    SavedCheckpoint,
    SavedSample,
    StopReason,
    StopTraining,
    TrainingEvent,
)
from worker.lease import Lease
from worker.shutdown import shutdown_requested

log = logging.getLogger(__name__)

# Events one attempt records: a job that keeps failing the same way (an OOM at every step) cannot
# fill the table; the rest go to the worker's log only.
MAX_EVENTS_PER_ATTEMPT = 100
# An event's message and detail strings are clipped to this: a compile error can run to pages.
MAX_EVENT_TEXT = 2000


def finite_or_none(value: float | None) -> float | None:
    """A window in which every step was skipped has a NaN mean: stored as null (JSON has no NaN)."""
    return value if value is not None and math.isfinite(value) else None


def _significant(value: float | None, digits: int = 4) -> float | None:
    return float(f"{value:.{digits}g}") if value is not None else None


def remove_files(store: CheckpointStore, job_id: uuid.UUID, keys: list[str]) -> None:
    """Delete files that no row names (any more). If the store is away they stay behind as
    garbage, which a later attempt of the job collects; training is not stopped for it."""
    for key in keys:
        try:
            store.delete(key)
        except StorageUnavailable as exc:
            log.warning("job %s: %s left in storage (%s)", job_id, key, exc)


class DatabaseSink:
    """The ML core's TrainingSink, writing under one attempt's lease."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        store: CheckpointStore,
        lease: Lease,
        keep: int,
        keep_best: bool = False,
        batch_size: int | None = None,
    ) -> None:
        self.sessionmaker = factory
        self.store = store
        self.lease = lease
        self.job_id, self.attempt = lease.job_id, lease.attempt
        self.keep = keep  # training.keep_checkpoints
        self.keep_best = keep_best  # training.keep_best
        self.batch_size = batch_size  # training.batch_size: images per step, for `jobs.steps_per_s`
        self.cancel_requested = False
        # Points not yet written (the database was briefly away); written with the next batch.
        self._pending: list[MetricPoint] = []
        self._events_recorded = 0  # of MAX_EVENTS_PER_ATTEMPT

    def on_log(self, point: MetricPoint) -> None:
        self._pending.append(point)
        try:
            with session_scope(self.sessionmaker) as session:
                rate = self._steps_per_s(point)
                self.lease.write_or_stop(session, step=point.step, loss=finite_or_none(point.loss), **rate)
                repo = JobRepository(session)
                repo.add_metric_points([self._row(p) for p in self._pending])
                self.cancel_requested = repo.is_cancel_requested(self.job_id)
            self._pending = []
            self.lease.renewed()
        except DBAPIError as exc:
            # Kept in _pending and written with the next point; if the database stays away,
            # the lease check stops training before the lease runs out.
            log.warning("job %s: metrics at step %d not written yet (%s)", self.job_id, point.step, exc.orig)
        if self.cancel_requested:
            raise StopTraining(StopReason.cancelled)
        self.lease.check()
        if shutdown_requested():
            raise StopTraining(StopReason.shutdown, "the worker is shutting down")

    def _steps_per_s(self, point: MetricPoint) -> dict[str, float]:
        """The job's measured rate (its ETA, app/usage/service.py) from this point's images/s;
        nothing to write when there is no batch size or no usable measure."""
        if not self.batch_size or not math.isfinite(point.images_per_s) or point.images_per_s <= 0:
            return {}
        return {"steps_per_s": point.images_per_s / self.batch_size}

    def _row(self, point: MetricPoint) -> MetricRow:
        loss = finite_or_none(point.loss)
        # An empty tuple: the loop did not measure it (null, as for points recorded before it was).
        # Four significant digits: enough for its chart, and the JSON stays ~80 B a row, not ~200.
        by_t = [_significant(finite_or_none(v)) for v in point.loss_by_t] or None
        return MetricRow(
            job_id=self.job_id,
            step=point.step,
            loss=loss,
            lr=point.lr,
            images_per_s=point.images_per_s,
            loss_by_t=by_t,
            mfu=_significant(finite_or_none(point.mfu)),
            peak_memory_bytes=point.peak_memory_bytes,
        )

    def on_sample(self, saved: SavedSample) -> None:
        try:
            key = self.store.publish(saved.path, saved.sha256)  # before its row (invariant 3)
        except StorageUnavailable as exc:  # a grid is a convenience: training goes on without it
            log.warning("job %s: sample grid at step %d not stored (%s)", self.job_id, saved.step, exc)
            return
        try:
            with session_scope(self.sessionmaker) as session:
                self.lease.write_or_stop(session)
                SampleRepository(session).add(
                    Sample(
                        job_id=self.job_id, step=saved.step, path=key, size_bytes=saved.size_bytes, sha256=saved.sha256
                    )
                )
                webhooks.record_step_event(session, self.job_id, "job.sample", saved.step, {})
        except DBAPIError as exc:  # a grid is a convenience: training goes on without it
            log.warning("job %s: sample grid at step %d not recorded (%s)", self.job_id, saved.step, exc.orig)
            self.lease.check()
            return
        self.store.discard_scratch(key)

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        publishing = time.perf_counter()
        try:
            # Stored whole before the row that names it (invariant 3); S3: uploaded here.
            keys = [self.store.publish(saved.state_path), self.store.publish(saved.path, saved.sha256)]
        except StorageUnavailable as exc:
            # Without its files there is no checkpoint to record. Stop without finishing: the
            # lease runs out and the sweeper hands the job to a new attempt, which resumes from
            # the last recorded checkpoint (and removes these files as garbage).
            log.warning("job %s: checkpoint at step %d not stored (%s)", self.job_id, saved.step, exc)
            raise StopTraining(StopReason.storage_unavailable, str(exc)) from exc
        # checkpoints.write_seconds (GET /metrics): writing the files, then storing them; not the
        # time the written checkpoint waited for the loop's next report.
        saved = dataclasses.replace(saved, write_s=saved.write_s + time.perf_counter() - publishing)
        try:
            removed = self._record_checkpoint(saved, *keys)
        except StopTraining:
            # Rolled back, so never recorded: this attempt's own files are garbage now (the newer
            # attempt's garbage collection may have run before they were stored).
            remove_files(self.store, self.job_id, keys)
            raise
        except DBAPIError as exc:
            # Not committed, so not a checkpoint: its files are garbage that the next attempt
            # removes. Training goes on; the next checkpoint is recorded if the database is back,
            # and the lease check stops us before the lease runs out if it is not.
            log.warning("job %s: checkpoint at step %d not recorded (%s)", self.job_id, saved.step, exc.orig)
            self.lease.check()
            return
        for key in keys:
            self.store.discard_scratch(key)
        # Files go only after their rows are gone (committed above).
        remove_files(self.store, self.job_id, [key for old in removed for key in (old.path, old.state_path)])
        self.lease.renewed()

    def _record_checkpoint(self, saved: SavedCheckpoint, state_key: str, weights_key: str) -> list[Checkpoint]:
        """Commit the checkpoint's row and drop the rows retention lets go; returns the dropped rows."""
        with session_scope(self.sessionmaker) as session:
            # The fenced write takes the row lock, so a concurrent claim cannot slip between the
            # check and the insert; the committed row is the checkpoint's commit point.
            self.lease.write_or_stop(session)
            repo = CheckpointRepository(session)
            repo.add(
                Checkpoint(
                    job_id=self.job_id,
                    step=saved.step,
                    path=weights_key,
                    size_bytes=saved.size_bytes,
                    sha256=saved.sha256,
                    state_path=state_key,
                    write_seconds=saved.write_s,
                )
            )
            session.flush()
            data = {"sha256": saved.sha256, "size_bytes": saved.size_bytes}
            webhooks.record_step_event(session, self.job_id, "job.checkpoint", saved.step, data)
            return self._retain(repo)

    def _retain(self, repo: CheckpointRepository) -> list[Checkpoint]:
        """Drop the checkpoint rows retention lets go (flushed rows count); returns them."""
        best = repo.best(self.job_id) if self.keep_best else None
        return repo.remove_older_than_newest(self.job_id, self.keep, also_keep=best.step if best else None)

    def on_evaluation(self, point: EvaluationPoint) -> None:
        try:
            with session_scope(self.sessionmaker) as session:
                self.lease.write_or_stop(session)
                EvaluationRepository(session).add(self._evaluation_row(point))
                session.flush()
                figures = {"fid": finite_or_none(point.fid), "kid": finite_or_none(point.kid)}
                webhooks.record_step_event(session, self.job_id, "job.evaluation", point.step, figures)
                removed = self._retain(CheckpointRepository(session)) if self.keep_best else []
        except DBAPIError as exc:  # a measurement is a convenience: training goes on without it
            log.warning("job %s: evaluation at step %d not recorded (%s)", self.job_id, point.step, exc.orig)
            self.lease.check()
            return
        # Files go only after their rows are gone (committed above).
        remove_files(self.store, self.job_id, [key for old in removed for key in (old.path, old.state_path)])
        self.lease.renewed()

    def _evaluation_row(self, point: EvaluationPoint) -> Evaluation:
        return Evaluation(job_id=self.job_id, **dataclasses.asdict(point))  # its columns are the point's fields

    def on_event(self, event: TrainingEvent) -> None:
        if self._events_recorded >= MAX_EVENTS_PER_ATTEMPT:
            log.warning(
                "job %s: event not recorded (%d already this attempt): %s",
                self.job_id,
                MAX_EVENTS_PER_ATTEMPT,
                event.message,
            )
            return
        try:
            with session_scope(self.sessionmaker) as session:
                self.lease.write_or_stop(session)  # a fenced attempt records nothing
                JobEventRepository(session).add(self._event_row(event))
        except DBAPIError as exc:  # a note for the owner: training goes on without it
            log.warning(
                "job %s: event at step %d not recorded (%s): %s", self.job_id, event.step, exc.orig, event.message
            )
            self.lease.check()
            return
        self._events_recorded += 1
        self.lease.renewed()

    def _event_row(self, event: TrainingEvent) -> JobEvent:
        detail = {k: v[:MAX_EVENT_TEXT] if isinstance(v, str) else v for k, v in event.detail.items()}
        return JobEvent(
            job_id=self.job_id,
            attempt=self.attempt,
            step=event.step,
            kind=str(event.kind),
            message=event.message[:MAX_EVENT_TEXT],
            detail=detail,
        )
