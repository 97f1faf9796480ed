"""The database sink against the real PostgreSQL: evaluation rows, loss_by_t, and keep_best retention
(rows first, then files)."""

from __future__ import annotations

import hashlib
import logging
import math
from datetime import timedelta

import pytest
from sqlalchemy import select

from app.checkpoints.store import LocalStore
from app.config import Settings
from app.db import session_scope
from app.jobs.service import requeue_expired
from app.models import Checkpoint, Evaluation, JobEvent, MetricPoint, utcnow
from tests.worker.test_lease import claimed_lease
from worker.database_sink import MAX_EVENTS_PER_ATTEMPT, DatabaseSink
from worker.ddpm.sink import EvaluationPoint, EventKind, SavedCheckpoint, StopReason, StopTraining, TrainingEvent
from worker.ddpm.sink import MetricPoint as LoggedPoint


def make_sink(settings: Settings, factory, *, keep: int = 2, keep_best: bool = True) -> DatabaseSink:
    return DatabaseSink(factory, LocalStore(settings.checkpoint_root), claimed_lease(factory), keep, keep_best)


def save_checkpoint(sink: DatabaseSink, settings: Settings, step: int) -> None:
    """A checkpoint's two files written where the trainer writes them, then reported."""
    folder = settings.checkpoint_root / str(sink.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    weights, state = folder / f"step-{step:08d}.safetensors", folder / f"step-{step:08d}.state.safetensors"
    weights.write_bytes(f"weights {step}".encode())
    state.write_bytes(f"state {step}".encode())
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    sink.on_checkpoint(SavedCheckpoint(step, weights, sha256, weights.stat().st_size, state))


def evaluate(sink: DatabaseSink, step: int, fid: float) -> None:
    sink.on_evaluation(EvaluationPoint(step, fid, fid / 1000, 0.001, 100, 500, "digits-classifier", 1.5))


def kept(sink: DatabaseSink, factory, settings: Settings) -> tuple[list[int], list[int]]:
    """The steps with a checkpoint row, and the steps with files on disk (asserted to be both)."""
    with session_scope(factory) as s:
        rows = list(s.scalars(select(Checkpoint.step).where(Checkpoint.job_id == sink.job_id).order_by("step")))
    names = sorted(p.name for p in (settings.checkpoint_root / str(sink.job_id)).iterdir())
    steps = sorted({int(name[5:13]) for name in names})
    assert names == sorted(f"step-{s:08d}{kind}.safetensors" for s in steps for kind in ("", ".state"))
    return rows, steps


class TestKeepBest:
    def test_the_lowest_fid_is_kept_besides_the_newest_and_a_better_one_replaces_it(
        self, clean_db: Settings, factory
    ) -> None:
        sink = make_sink(clean_db, factory)
        # 400 ties 200: the earliest step is the best.
        for step, fid in [(100, 50.0), (200, 10.0), (300, 30.0), (400, 10.0), (500, 40.0)]:
            save_checkpoint(sink, clean_db, step)
            evaluate(sink, step, fid)
        assert kept(sink, factory, clean_db) == ([200, 400, 500], [200, 400, 500])
        # 600's checkpoint arrives before its evaluation: 200 is still the best then.
        save_checkpoint(sink, clean_db, 600)
        assert kept(sink, factory, clean_db) == ([200, 500, 600], [200, 500, 600])
        evaluate(sink, 600, 8.0)  # the new best is among the newest: 200 goes
        assert kept(sink, factory, clean_db) == ([500, 600], [500, 600])
        with session_scope(factory) as s:
            fids = s.execute(select(Evaluation.step, Evaluation.fid).where(Evaluation.job_id == sink.job_id))
            assert sorted(fids) == [(100, 50.0), (200, 10.0), (300, 30.0), (400, 10.0), (500, 40.0), (600, 8.0)]

    def test_a_non_finite_fid_is_never_the_best(self, clean_db: Settings, factory) -> None:
        sink = make_sink(clean_db, factory, keep=1)
        for step, fid in [(100, 20.0), (200, math.nan), (300, math.inf), (400, 30.0)]:
            save_checkpoint(sink, clean_db, step)
            evaluate(sink, step, fid)
        assert kept(sink, factory, clean_db) == ([100, 400], [100, 400])

    def test_without_keep_best_evaluations_do_not_change_retention(self, clean_db: Settings, factory) -> None:
        sink = make_sink(clean_db, factory, keep_best=False)
        for step, fid in [(100, 1.0), (200, 50.0), (300, 40.0)]:
            save_checkpoint(sink, clean_db, step)
            evaluate(sink, step, fid)
        assert kept(sink, factory, clean_db) == ([200, 300], [200, 300])


class TestEvaluationRows:
    def test_the_row_holds_the_point(self, clean_db: Settings, factory) -> None:
        sink = make_sink(clean_db, factory)
        sink.on_evaluation(EvaluationPoint(40, 12.5, 0.0125, 0.002, 1000, 60000, "inception-v3", 3.25))
        with session_scope(factory) as s:
            row = s.get(Evaluation, (sink.job_id, 40))
            values = (row.fid, row.kid, row.kid_std, row.samples, row.reference_images, row.feature_network)
            assert values == (12.5, 0.0125, 0.002, 1000, 60000, "inception-v3")
            assert row.seconds == 3.25

    def test_a_failed_write_is_logged_and_training_goes_on(
        self, clean_db: Settings, factory, caplog: pytest.LogCaptureFixture
    ) -> None:
        sink = make_sink(clean_db, factory)
        evaluate(sink, 40, 12.0)
        with caplog.at_level(logging.WARNING, logger="worker.database_sink"):
            evaluate(sink, 40, 11.0)  # the same step again: the insert fails (a DBAPIError)
        assert "evaluation at step 40 not recorded" in caplog.text
        with session_scope(factory) as s:
            assert s.get(Evaluation, (sink.job_id, 40)).fid == 12.0

    def test_a_fenced_attempt_stops_and_writes_nothing(self, clean_db: Settings, factory) -> None:
        sink = make_sink(clean_db, factory)
        with session_scope(factory) as s:  # the sweeper hands the job to a new attempt
            assert requeue_expired(s, utcnow() + timedelta(hours=1)) == [sink.job_id]
        with pytest.raises(StopTraining) as stopped:
            evaluate(sink, 40, 12.0)
        assert stopped.value.reason is StopReason.fenced
        with session_scope(factory) as s:
            assert s.get(Evaluation, (sink.job_id, 40)) is None


class TestLossByT:
    def test_nulls_and_four_significant_digits(self, clean_db: Settings, factory) -> None:
        sink = make_sink(clean_db, factory)
        sink.on_log(LoggedPoint(10, 0.5, 1e-4, 100.0, (0.75, None, math.nan, math.inf, 0.2500049)))
        sink.on_log(LoggedPoint(20, 0.5, 1e-4, 100.0))
        with session_scope(factory) as s:
            rows = s.scalars(select(MetricPoint).where(MetricPoint.job_id == sink.job_id).order_by(MetricPoint.step))
            assert [r.loss_by_t for r in rows] == [[0.75, None, None, None, 0.25], None]


class TestEfficiencyFields:
    def test_mfu_and_peak_memory_are_stored_finite_or_null(self, clean_db: Settings, factory) -> None:
        sink = make_sink(clean_db, factory)
        sink.on_log(LoggedPoint(10, 0.5, 1e-4, 100.0, mfu=0.3141592, peak_memory_bytes=5 * 2**33))
        sink.on_log(LoggedPoint(20, 0.5, 1e-4, 100.0, mfu=math.nan))
        sink.on_log(LoggedPoint(30, 0.5, 1e-4, 100.0))  # the CPU: neither is known
        with session_scope(factory) as s:
            rows = s.execute(
                select(MetricPoint.mfu, MetricPoint.peak_memory_bytes)
                .where(MetricPoint.job_id == sink.job_id)
                .order_by(MetricPoint.step)
            )
            assert [tuple(r) for r in rows] == [(0.3142, 5 * 2**33), (None, None), (None, None)]


def oom(step: int) -> TrainingEvent:
    detail: dict[str, int | str] = {"micro_batch": 32, "was": 64, "batch": 128}
    return TrainingEvent(step, EventKind.oom_halved, "out of memory: micro-batch 64 -> 32", detail)


def event_rows(factory, job_id) -> list[tuple]:
    with session_scope(factory) as s:
        stmt = select(JobEvent.attempt, JobEvent.step, JobEvent.kind, JobEvent.message, JobEvent.detail)
        return [tuple(r) for r in s.execute(stmt.where(JobEvent.job_id == job_id).order_by(JobEvent.id))]


class TestEvents:
    def test_an_event_is_a_row_of_its_attempt_with_long_text_clipped(self, clean_db: Settings, factory) -> None:
        sink = make_sink(clean_db, factory)
        sink.on_event(oom(7))
        failed = TrainingEvent(1, EventKind.compile_failed, "torch.compile failed", {"error": "E" * 5000})
        sink.on_event(failed)
        rows = event_rows(factory, sink.job_id)
        assert rows[0] == (1, 7, "oom_halved", "out of memory: micro-batch 64 -> 32", oom(7).detail)
        assert rows[1][:4] == (1, 1, "compile_failed", "torch.compile failed")
        assert rows[1][4] == {"error": "E" * 2000}

    def test_an_attempt_records_at_most_its_bound(
        self, clean_db: Settings, factory, caplog: pytest.LogCaptureFixture
    ) -> None:
        sink = make_sink(clean_db, factory)
        with caplog.at_level(logging.WARNING, logger="worker.database_sink"):
            for step in range(1, MAX_EVENTS_PER_ATTEMPT + 3):
                sink.on_event(oom(step))
        assert len(event_rows(factory, sink.job_id)) == MAX_EVENTS_PER_ATTEMPT
        assert caplog.text.count("event not recorded") == 2

    def test_a_fenced_attempt_stops_and_writes_nothing(self, clean_db: Settings, factory) -> None:
        sink = make_sink(clean_db, factory)
        with session_scope(factory) as s:  # the sweeper hands the job to a new attempt
            assert requeue_expired(s, utcnow() + timedelta(hours=1)) == [sink.job_id]
        with pytest.raises(StopTraining) as stopped:
            sink.on_event(oom(3))
        assert stopped.value.reason is StopReason.fenced
        assert event_rows(factory, sink.job_id) == []
