"""Metric retention (app/metrics/retention.py): the downsampling method checked against sums done
by hand, and the sweeper's pass over real PostgreSQL rows."""

from __future__ import annotations

import itertools
import statistics
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope
from app.jobs.lifecycle import continue_job
from app.jobs.service import create_job
from app.metrics.retention import downsample
from app.models import Job, MetricPoint, User, utcnow
from app.spec import JobSpec
from worker.sweeper import downsample_metrics


def _point(step: int, loss: float | None, ips: float = 100.0, by_t: list[float | None] | None = None) -> MetricPoint:
    return MetricPoint(step=step, loss=loss, lr=step / 1_000_000, images_per_s=ips, loss_by_t=by_t)


def _values(points: list[MetricPoint]) -> list[tuple[int, float | None, float, float]]:
    return [(p.step, p.loss, p.lr, p.images_per_s) for p in points]


class TestDownsample:
    def test_windows_weight_each_point_by_the_steps_it_covers(self) -> None:
        # Points at 10, 20, 30, 40, then 45 (a resumed run's short window), 60, 80.
        points = [_point(10, 1.0), _point(20, 0.8), _point(30, 0.6), _point(40, 0.4, ips=50.0),
                  _point(45, 0.2), _point(60, 0.1, ips=25.0), _point(80, None)]  # fmt: skip
        kept = downsample(points, 3)  # the first point, then 2 windows over (10, 80]: (10, 45], (45, 80]
        assert _values(kept) == [
            (10, 1.0, 10 / 1_000_000, 100.0),
            # steps 11..45: 10 x 0.8 + 10 x 0.6 + 10 x 0.4 + 5 x 0.2 over 35 steps; images/s: 35 steps
            # over 10/100 + 10/100 + 10/50 + 5/100 seconds (per image of the batch)
            (45, pytest.approx((8 + 6 + 4 + 1) / 35), 45 / 1_000_000, pytest.approx(35 / (0.1 + 0.1 + 0.2 + 0.05))),
            # steps 46..80: the point at 80 has no loss (every step non-finite): 15 x 0.1 / 15
            (80, pytest.approx(0.1), 80 / 1_000_000, pytest.approx(35 / (15 / 25 + 20 / 100))),
        ]

    def test_loss_by_t_is_weighted_per_range_over_the_points_that_have_it(self) -> None:
        points = [_point(10, 1.0), _point(20, 1.0, by_t=[1.0, None]), _point(50, 1.0, by_t=[2.0, 4.0]), _point(60, 1.0)]
        kept = downsample(points, 2)
        assert [p.loss_by_t for p in kept] == [None, [pytest.approx((10 * 1.0 + 30 * 2.0) / 40), 4.0]]

    def test_mfu_follows_images_per_s_and_peak_memory_is_the_windows_largest(self) -> None:
        # mfu is images/s x a constant (0.001 here): the merged one is 0.001 x the merged images/s.
        points = [MetricPoint(step=s, loss=1.0, lr=0.0, images_per_s=ips, mfu=ips / 1000, peak_memory_bytes=peak)
                  for s, ips, peak in [(10, 100.0, 5), (20, 100.0, 9), (40, 50.0, 7), (60, 25.0, None)]]  # fmt: skip
        points.append(MetricPoint(step=80, loss=1.0, lr=0.0, images_per_s=25.0))  # a point from before they were kept
        kept = downsample(points, 3)  # windows (10, 45] and (45, 80]
        assert [(p.step, p.peak_memory_bytes) for p in kept] == [(10, 5), (40, 9), (80, None)]
        assert [p.mfu for p in kept] == [0.1, pytest.approx(kept[1].images_per_s / 1000), 0.025]

    def test_short_curves_are_kept_and_bounds_hold_for_long_ones(self) -> None:
        few = [_point(s, 1.0) for s in (5, 10)]
        assert downsample(few, 10) == few
        many = [_point(s, float(s)) for s in range(10, 100_001, 10)]
        kept = downsample(many, 1000)
        assert len(kept) == 1000 and (kept[0].step, kept[-1].step) == (10, 100_000)
        assert [p.step for p in kept] == sorted({p.step for p in kept})
        # each window's loss is the mean of the steps' losses it covers (here each point's own step)
        assert kept[1].loss == pytest.approx(sum(range(20, kept[1].step + 1, 10)) / ((kept[1].step - 10) / 10))
        # Thinned again (a continued job that ages once more), each point is still the mean loss
        # over exactly the steps since the point before it: merged points weigh what they cover.
        again = downsample(kept, 100)
        bounds = [0] + [p.step for p in again]
        exact = [statistics.mean(range(a + 10, b + 1, 10)) for a, b in itertools.pairwise(bounds)]
        assert len(again) == 100 and [p.loss for p in again] == pytest.approx(exact)


class TestSweeperPass:
    def _finished_job(self, factory, owner: User, points: int, finished_days_ago: float) -> uuid.UUID:  # type: ignore[no-untyped-def]
        with session_scope(factory) as s:
            job, _ = create_job(s, JobSpec(), owner=owner, settings=Settings())
            job.status, job.finished_at, job.step = "succeeded", utcnow() - timedelta(days=finished_days_ago), 500
            steps = range(10, 10 * points + 1, 10)
            s.add_all(MetricPoint(job_id=job.id, step=n, loss=1.0, lr=1e-4, images_per_s=1.0) for n in steps)
            return job.id

    def test_old_finished_jobs_are_thinned_once_and_a_continued_one_again_later(
        self, clean_db: Settings, owner: User
    ) -> None:
        factory = make_sessionmaker(make_engine(clean_db))
        settings = clean_db.model_copy(update={"metrics_retention_days": 7, "metrics_retention_points": 10})
        old, recent, short = (self._finished_job(factory, owner, n, days) for n, days in ((50, 8), (50, 6), (5, 8)))
        assert downsample_metrics(clean_db, factory) == 0  # retention off (0 days): nothing happens
        assert downsample_metrics(settings, factory) == 2
        assert downsample_metrics(settings, factory) == 0

        def steps(job_id: uuid.UUID) -> tuple[list[int], bool]:
            with session_scope(factory) as s:
                stamped = s.get(Job, job_id).metrics_downsampled_at is not None  # type: ignore[union-attr]
                stmt = select(MetricPoint.step).where(MetricPoint.job_id == job_id).order_by(MetricPoint.step)
                return list(s.scalars(stmt)), stamped

        assert steps(old) == ([10, 60, 110, 170, 220, 280, 330, 390, 440, 500], True)
        assert steps(recent) == ([10 * (i + 1) for i in range(50)], False)
        assert steps(short) == ([10, 20, 30, 40, 50], True)
        with session_scope(factory) as s:  # continued: the stamp goes, and it is thinned again once it ages
            continue_job(s, old, owner, 600, settings=Settings())
        with session_scope(factory) as s:
            ended = utcnow() - timedelta(days=8)
            s.execute(update(Job).where(Job.id == old).values(status="succeeded", finished_at=ended))
            s.add(MetricPoint(job_id=old, step=600, loss=1.0, lr=1e-4, images_per_s=1.0))
        assert downsample_metrics(settings, factory) == 1
        assert steps(old)[0][0] == 10 and steps(old)[0][-1] == 600 and len(steps(old)[0]) <= 10
