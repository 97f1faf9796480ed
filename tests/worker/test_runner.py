"""The runner against the real PostgreSQL, with the real (tiny) training loop in-process."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from datetime import timedelta

import redis
from PIL import Image
from sqlalchemy import select

from app.auth.service import get_or_create_user
from app.checkpoints.repository import CheckpointRepository
from app.config import Settings
from app.db import session_scope
from app.jobs.repository import JobRepository
from app.jobs.service import cancel_job, create_job
from app.models import Checkpoint, Evaluation, Job, JobLogLine, MetricPoint, utcnow
from app.routing import train_queue
from app.samples.repository import SampleRepository
from app.spec import JobSpec
from tests.worker.conftest import expire_lease
from worker import shutdown
from worker.database_sink import DatabaseSink
from worker.runner import JobRunner
from worker.sweeper import sweep_once

TINY = {
    "dataset": {"image_size": 8},
    "training": {"steps": 40, "batch_size": 16, "log_every": 10, "checkpoint_every": 20, "keep_checkpoints": 5},
}


# The runner's tests submit folder data sets from tmp_path: any path is inside this root, and
# the API does not look inside (as when it cannot see the workers' data): the worker must.
SUBMIT_SETTINGS = Settings(data_roots=["/"], dataset_folder_check="never")


def submit(factory, spec: dict) -> uuid.UUID:
    with session_scope(factory) as s:
        owner = get_or_create_user(s, "owner")
        return create_job(s, JobSpec.model_validate(spec), owner=owner, settings=SUBMIT_SETTINGS)[0].id


def load(factory, job_id: uuid.UUID) -> tuple[Job, list[MetricPoint], list[Checkpoint]]:
    with session_scope(factory) as s:
        job = s.get(Job, job_id)
        points = list(s.scalars(select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(MetricPoint.step)))
        ckpts = list(s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))
        s.expunge_all()
        return job, points, ckpts


class TestRun:
    def test_a_queued_job_trains_to_success(self, runner: JobRunner, factory, clean_db: Settings) -> None:
        job_id = submit(factory, TINY)
        assert runner.run(job_id) == "succeeded"
        job, points, ckpts = load(factory, job_id)
        assert (job.status, job.step, job.attempt) == ("succeeded", 40, 1)
        assert job.finished_at is not None and job.error is None
        assert [p.step for p in points] == [10, 20, 30, 40]
        assert job.loss == points[-1].loss
        assert [c.step for c in ckpts] == [20, 40]
        for c in ckpts:
            data = (clean_db.checkpoint_root / c.path).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (c.size_bytes, c.sha256)

    def test_sample_grids_are_recorded_and_a_resume_redraws_the_ones_it_redoes(
        self, runner: JobRunner, factory, clean_db: Settings, monkeypatch, caplog
    ) -> None:
        caplog.set_level(logging.INFO, logger="worker")  # as the worker runs (--loglevel=INFO)
        spec = TINY | {"training": TINY["training"] | {"steps": 60, "sample_every": 15, "sample_count": 4}}
        job_id = submit(factory, spec)
        original = DatabaseSink.on_log

        def lose_lease_at_step_50(self, point) -> None:
            original(self, point)
            if point.step == 50 and self.attempt == 1:
                # Meanwhile the sweeper (another thread) speaks of another job: not this job's log.
                other = threading.Thread(target=logging.getLogger("worker.sweeper").warning, args=("another job",))
                other.start()
                other.join()
                expire_lease(factory, self.job_id)

        monkeypatch.setattr(DatabaseSink, "on_log", lose_lease_at_step_50)
        assert runner.run(job_id) == "fenced"
        assert runner.run(job_id) == "succeeded"  # resumes from the checkpoint at 40
        with session_scope(factory) as s:
            samples = SampleRepository(s).list(job_id)
            s.expunge_all()
        assert [x.step for x in samples] == [15, 30, 45, 60]
        assert [x.path.split("/")[1] for x in samples] == ["attempt-1"] * 2 + ["attempt-2"] * 2
        for x in samples:
            assert hashlib.sha256((clean_db.checkpoint_root / x.path).read_bytes()).hexdigest() == x.sha256
        left = sorted(p.name for p in (clean_db.checkpoint_root / str(job_id)).rglob("*.png"))
        assert left == [f"step-{n:08d}.png" for n in (15, 30, 45, 60)], "the first attempt's grid at 45 is gone"
        # Each attempt kept its own log lines (worker/job_log.py), and only its own.
        with session_scope(factory) as s:
            rows = s.scalars(select(JobLogLine).where(JobLogLine.job_id == job_id).order_by("attempt", "seq"))
            kept = [(r.attempt, r.seq, r.level, r.logger, r.message) for r in rows]
        first = [line[2:] for line in kept if line[0] == 1]
        assert [line[1] for line in kept if line[0] == 1] == list(range(len(first)))
        fenced = f"job {job_id}: attempt 1 fenced off by a newer attempt; stopped"
        assert ("WARNING", "worker.attempt", fenced) in first
        assert kept[-1][:2] == (2, len(kept) - len(first) - 1)
        assert kept[-1][2:] == ("INFO", "worker.attempt", f"job {job_id}: attempt 2 ended succeeded")
        assert not [line for line in kept if "another job" in line[4] or (line[0] == 1 and "attempt 2" in line[4])]

    def test_evaluations_are_recorded_and_the_best_checkpoint_outlives_retention(
        self, runner: JobRunner, factory, clean_db: Settings
    ) -> None:
        spec = TINY | {
            "training": TINY["training"] | {"keep_checkpoints": 1, "keep_best": True},
            "evaluation": {"every": 10, "samples": 64, "steps": 5},
        }
        job_id = submit(factory, spec)
        assert runner.run(job_id) == "succeeded"
        _, points, ckpts = load(factory, job_id)
        with session_scope(factory) as s:
            evaluations = list(s.scalars(select(Evaluation).where(Evaluation.job_id == job_id).order_by("step")))
            best = CheckpointRepository(s).best(job_id)
            s.expunge_all()
        assert [(e.step, e.samples, e.reference_images, e.feature_network) for e in evaluations] == [
            (step, 64, 1797, "digits-classifier") for step in (10, 20, 30, 40)
        ]
        assert all(math.isfinite(e.fid) and e.fid > 0 and e.seconds > 0 for e in evaluations)
        lowest = min(evaluations, key=lambda e: (e.fid, e.step)).step
        # Every evaluation step saved a checkpoint; retention kept the newest and the lowest FID's.
        assert best is not None and best.step == lowest
        assert [c.step for c in ckpts] == sorted({lowest, 40})
        # Each metric point carries the loss per tenth of [0, T); the digits classifier is kept in storage.
        assert all(len(p.loss_by_t) == 10 for p in points)
        assert (clean_db.checkpoint_root / "evaluation" / "networks" / "digits-classifier-v1.pt").is_file()

    def test_a_second_delivery_does_nothing(self, runner: JobRunner, factory) -> None:
        job_id = submit(factory, TINY)
        runner.run(job_id)
        before = load(factory, job_id)
        assert runner.run(job_id) == "skipped"
        after = load(factory, job_id)
        assert (after[0].attempt, after[0].updated_at, len(after[1])) == (1, before[0].updated_at, len(before[1]))

    def test_old_checkpoints_are_pruned_rows_first(self, runner: JobRunner, factory, clean_db: Settings) -> None:
        spec = TINY | {"training": TINY["training"] | {"checkpoint_every": 10, "keep_checkpoints": 2}}
        job_id = submit(factory, spec)
        runner.run(job_id)
        _, _, ckpts = load(factory, job_id)
        assert [c.step for c in ckpts] == [30, 40]
        on_disk = sorted(p.name for p in (clean_db.checkpoint_root / str(job_id)).rglob("*.safetensors"))
        assert on_disk == [
            "step-00000030.safetensors",
            "step-00000030.state.safetensors",
            "step-00000040.safetensors",
            "step-00000040.state.safetensors",
        ]

    def test_a_dataset_error_fails_the_job_with_the_path(self, runner: JobRunner, factory, clean_db: Settings) -> None:
        missing = clean_db.data_roots[0] / "no-such-folder"
        job_id = submit(factory, TINY | {"dataset": {"kind": "folder", "path": "no-such-folder", "image_size": 8}})
        assert runner.run(job_id) == "failed"
        job, points, _ = load(factory, job_id)
        assert job.status == "failed"
        assert str(missing) in job.error  # relative to the first data root, as the API reads it
        assert points == []

    def test_the_worker_refuses_a_folder_that_left_the_data_roots_after_submit(
        self, runner: JobRunner, factory, clean_db: Settings, tmp_path
    ) -> None:
        root = clean_db.data_roots[0]
        root.mkdir(parents=True, exist_ok=True)
        (root / "digits-link").unlink(missing_ok=True)
        # A link inside the root that leads out of it (SUBMIT_SETTINGS let any path through).
        (root / "digits-link").symlink_to(tmp_path)
        job_id = submit(factory, TINY | {"dataset": {"kind": "folder", "path": "digits-link", "image_size": 8}})
        assert runner.run(job_id) == "failed"
        job = load(factory, job_id)[0]
        assert "outside the data roots" in job.error and str(tmp_path) in job.error

    def test_the_worker_refuses_a_link_to_a_file_outside_the_data_roots(
        self, runner: JobRunner, factory, clean_db: Settings, tmp_path
    ) -> None:
        folder = clean_db.data_roots[0] / "linked-file"
        folder.mkdir(parents=True, exist_ok=True)
        outside = tmp_path / "private.png"
        Image.new("L", (8, 8), 7).save(outside)
        Image.new("L", (8, 8), 9).save(folder / "a.png")
        (folder / "b.png").unlink(missing_ok=True)
        (folder / "b.png").symlink_to(outside)
        job_id = submit(factory, TINY | {"dataset": {"kind": "folder", "path": "linked-file", "image_size": 8}})
        assert runner.run(job_id) == "failed"
        job, points, _ = load(factory, job_id)
        assert f"resolves to {outside}, outside the folder" in job.error and points == []


class TestStopping:
    def test_cancel_stops_a_running_job_at_a_log_boundary_and_keeps_a_checkpoint_there(
        self, runner: JobRunner, factory
    ) -> None:
        # Checkpoints every 30 steps, logs every 10: the step it stops at is rarely one of them.
        job_id = submit(factory, TINY | {"training": TINY["training"] | {"steps": 100_000, "checkpoint_every": 30}})
        thread = threading.Thread(target=runner.run, args=(job_id,))
        thread.start()
        deadline = time.monotonic() + 60
        while load(factory, job_id)[0].step < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        with session_scope(factory) as s:
            cancel_job(s, job_id, get_or_create_user(s, "owner"))
        thread.join(timeout=60)
        job, points, ckpts = load(factory, job_id)
        assert job.status == "cancelled"
        assert 20 <= job.step < 100_000
        assert points[-1].step == job.step
        # A checkpoint of the step it stopped at, committed (so it can be sampled, exported, resumed).
        assert ckpts[-1].step == job.step
        assert runner.store.resolve(ckpts[-1].path).is_file()

    def test_a_fenced_runner_stops_and_writes_nothing_more(self, runner: JobRunner, factory, monkeypatch) -> None:
        job_id = submit(factory, TINY | {"training": TINY["training"] | {"steps": 100}})
        original = DatabaseSink.on_log

        def on_log_then_lose_the_lease(self, point) -> None:
            original(self, point)
            if point.step == 30:
                # What the sweeper does when this worker's lease expires: the job goes back to
                # the queue, and this attempt is no longer current.
                expire_lease(factory, job_id)

        monkeypatch.setattr(DatabaseSink, "on_log", on_log_then_lose_the_lease)
        assert runner.run(job_id) == "fenced"
        job, points, ckpts = load(factory, job_id)
        assert (job.status, job.step) == ("queued", 30)
        assert [p.step for p in points] == [10, 20, 30]
        assert [c.step for c in ckpts] == [20]

    def test_a_resumed_attempt_continues_the_same_loss_history(self, runner: JobRunner, factory, monkeypatch) -> None:
        spec = TINY | {"training": TINY["training"] | {"steps": 60, "checkpoint_every": 20}}
        straight = submit(factory, spec)
        runner.run(straight)
        _, straight_points, _ = load(factory, straight)

        interrupted = submit(factory, spec)
        original = DatabaseSink.on_log

        def lose_lease_after_step_30(self, point) -> None:
            original(self, point)
            if point.step == 30 and self.attempt == 1:
                expire_lease(factory, self.job_id)

        monkeypatch.setattr(DatabaseSink, "on_log", lose_lease_after_step_30)
        assert runner.run(interrupted) == "fenced"
        assert load(factory, interrupted)[0].status == "queued"
        assert runner.run(interrupted) == "succeeded"
        job, points, _ = load(factory, interrupted)
        assert job.attempt == 2
        assert [(p.step, p.loss) for p in points] == [(p.step, p.loss) for p in straight_points]

    def test_shutdown_checkpoints_the_current_step_and_requeues(
        self, runner: JobRunner, factory, monkeypatch, clean_db: Settings
    ) -> None:
        job_id = submit(factory, TINY | {"training": TINY["training"] | {"steps": 100}})
        original = DatabaseSink.on_log

        def sigterm_at_step_30(self, point) -> None:
            if point.step == 30:
                shutdown.request_shutdown()  # what celery's worker_shutting_down calls
            original(self, point)

        monkeypatch.setattr(DatabaseSink, "on_log", sigterm_at_step_30)
        # What celery_app registers: cancel the worker's consumer. It must run before the job is
        # back in the queue, or the worker takes it again on its way out.
        status_when_consuming_stopped: list[str] = []
        shutdown.on_stop_consuming(lambda: status_when_consuming_stopped.append(load(factory, job_id)[0].status))
        try:
            assert runner.run(job_id) == "requeued"
        finally:
            shutdown._SHUTDOWN.clear()
            shutdown.on_stop_consuming(None)
        assert status_when_consuming_stopped == ["running"]
        job, points, ckpts = load(factory, job_id)
        # The stop is counted apart: restarts do not use up DDPM_MAX_ATTEMPTS.
        assert (job.status, job.step, job.worker, job.attempt, job.stops) == ("queued", 30, None, 1, 1)
        assert job.dispatched_at is not None
        assert [c.step for c in ckpts] == [20, 30]
        queue = train_queue(clean_db.queue, JobSpec.model_validate(job.spec))
        messages = redis.Redis.from_url(clean_db.broker_url).lrange(queue, 0, -1)
        assert any(json.loads(m)["headers"]["argsrepr"] == repr([str(job_id)]) for m in messages)
        # The next attempt resumes at step 30 and finishes.
        monkeypatch.setattr(DatabaseSink, "on_log", original)
        assert runner.run(job_id) == "succeeded"
        job, points, _ = load(factory, job_id)
        assert (job.attempt, job.stops, job.step) == (2, 1, 100)
        assert [p.step for p in points] == list(range(10, 101, 10))


class TestSweeper:
    def test_requeues_expired_leases_and_resends_unsent_jobs(self, clean_db: Settings, factory) -> None:
        job_id = submit(factory, TINY)
        sent: list[str] = []

        class Recorder:
            def send_train(self, job: str, queue: str) -> None:
                sent.append(job)

        with session_scope(factory) as s:
            job = s.get(Job, job_id)
            job.created_at = utcnow() - timedelta(hours=1)
        assert sweep_once(clean_db, factory, Recorder()) == (0, 1)
        assert sent == [str(job_id)]
        # Sent just now: not sent again on the next pass.
        assert sweep_once(clean_db, factory, Recorder()) == (0, 0)

        with session_scope(factory) as s:
            JobRepository(s).claim(job_id, "dead-worker")
            s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(hours=1)
        assert sweep_once(clean_db, factory, Recorder()) == (1, 1)
        assert load(factory, job_id)[0].status == "queued"

    def test_a_job_that_keeps_losing_its_worker_fails_with_the_reason(self, clean_db: Settings, factory) -> None:
        job_id = submit(factory, TINY)
        settings = clean_db.model_copy(update={"max_attempts": 2})

        class Recorder:
            def send_train(self, job: str, queue: str) -> None:
                pass

        for stop in (1, 2, 3):  # graceful stops (worker restarts) are not lost attempts
            with session_scope(factory) as s:
                assert JobRepository(s).claim(job_id, "restarting-worker") == stop
                assert JobRepository(s).requeue_for_shutdown(job_id, stop)
        for lost in (1, 2):
            with session_scope(factory) as s:
                assert JobRepository(s).claim(job_id, f"worker-{lost}") == 3 + lost
                s.get(Job, job_id).heartbeat_at = utcnow() - timedelta(hours=1)
            requeued, _ = sweep_once(settings, factory, Recorder())
            assert requeued == (1 if lost == 1 else 0)
        job = load(factory, job_id)[0]
        assert job.status == "failed"
        assert job.error.startswith("gave up after 2 attempts") and "worker-2" in job.error

    def test_a_lost_job_with_a_cancel_request_ends_cancelled(self, clean_db: Settings, factory) -> None:
        job_id = submit(factory, TINY)
        with session_scope(factory) as s:
            JobRepository(s).claim(job_id, "w")
            job = s.get(Job, job_id)
            job.heartbeat_at, job.cancel_requested = utcnow() - timedelta(hours=1), True

        class Recorder:
            def send_train(self, job: str, queue: str) -> None:
                raise AssertionError("a cancelled job is not sent again")

        assert sweep_once(clean_db, factory, Recorder()) == (0, 0)
        assert load(factory, job_id)[0].status == "cancelled"
