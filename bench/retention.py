"""The capacity benchmark's retention section: what metric retention (app/metrics/retention.py)
saves on one long job. A finished 100,000-step job logged every 10 steps (10,000 metric points,
each with its loss by timestep, as the worker writes them) in a throwaway database, thinned by the
sweeper's own function to DDPM_METRICS_RETENTION_POINTS (1,000 by default); the metric_points
table measured before and after, after VACUUM FULL (so the figures are the rows' own pages and
index, not the free space a plain VACUUM would leave for new rows to reuse)."""

from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

import psycopg

from app.auth.service import get_or_create_user
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope, upgrade_database
from app.jobs.service import create_job
from app.metrics.retention import thin_job_metrics
from app.models import MetricPoint, utcnow
from app.spec import JobSpec
from bench.common import throwaway_database

LOG_EVERY = 10
KEEP = Settings.model_fields["metrics_retention_points"].default


def _sizes(url: str) -> tuple[int, int, int]:
    """(rows, bytes of row data, bytes on disk: heap, TOAST and index) of metric_points."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute("VACUUM FULL metric_points")
        rows, data, disk = conn.execute(
            "SELECT count(*), coalesce(sum(pg_column_size(m.*)), 0), pg_total_relation_size('metric_points') "
            "FROM metric_points m"
        ).fetchone()  # type: ignore[misc]
    return int(rows), int(data), int(disk)


def _points(job_id: Any, steps: int) -> list[MetricPoint]:
    """A plausible loss curve: falling, with a loss for each tenth of the timesteps."""
    return [
        MetricPoint(
            job_id=job_id,
            step=step,
            loss=0.05 + 0.9 * math.exp(-step / 5000) + 0.01 * math.sin(step),
            lr=2e-4,
            images_per_s=1800.0 + 50 * math.sin(step / 7),
            loss_by_t=[0.02 + 0.1 * b + 0.5 * math.exp(-step / 5000) for b in range(10)],
        )
        for step in range(LOG_EVERY, steps + 1, LOG_EVERY)
    ]


def measure(short: bool = False) -> dict[str, float]:
    steps = 10_000 if short else 100_000
    print(f"-- retention: a finished {steps:,}-step job logged every {LOG_EVERY} steps, thinned to {KEEP} points")
    with throwaway_database() as url:
        settings = Settings(database_url=url)
        upgrade_database(settings)
        engine = make_engine(settings)
        factory = make_sessionmaker(engine)
        with session_scope(factory) as s:
            owner = get_or_create_user(s, "bench retention")
            spec = JobSpec.model_validate({"training": {"steps": steps}})
            job, _ = create_job(s, spec, owner=owner, settings=settings)
            job.status, job.step, job.finished_at = "succeeded", steps, utcnow() - timedelta(days=31)
            job_id = job.id
            s.add_all(_points(job_id, steps))
        before = _sizes(url)
        start = time.perf_counter()
        with session_scope(factory) as s:
            thinned = thin_job_metrics(s, job_id, KEEP)
        seconds = time.perf_counter() - start
        after = _sizes(url)
        engine.dispose()
    assert thinned is not None and thinned.after == after[0]
    figures = {
        "retention_points_before": float(before[0]),
        "retention_points_after": float(after[0]),
        "retention_row_bytes_before": float(before[1]),
        "retention_row_bytes_after": float(after[1]),
        "retention_disk_bytes_before": float(before[2]),
        "retention_disk_bytes_after": float(after[2]),
        "retention_seconds": seconds,
    }
    for what, i in (("row data", 1), ("on disk (heap, TOAST, index)", 2)):
        saved = 1 - after[i] / before[i]
        print(f"  metric_points {what}: {before[i] / 1e6:.2f} MB -> {after[i] / 1e6:.3f} MB ({saved:.1%} saved)")
    print(f"  rows: {before[0]:,} -> {after[0]:,}; thinning took {seconds:.2f} s (one transaction)")
    return figures
