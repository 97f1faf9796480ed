"""Metric retention: a finished job's loss curve, thinned once it is old enough.

A job logged every 10 steps for 100,000 steps keeps 10,000 metric points; after
DDPM_METRICS_RETENTION_DAYS (when > 0) the sweeper replaces them by at most
DDPM_METRICS_RETENTION_POINTS points and stamps `jobs.metrics_downsampled_at`.

The method (`downsample`): a point is the mean loss over the steps since the previous point, so
it *covers* `step - previous step` steps (the first one: its own step). The first point is kept as
it is; the others are grouped into `max_points - 1` windows of equal step span over
(first step, last step], and each non-empty window becomes one point at its last step (so the
last step is kept too), holding
- loss: the mean of its points' losses weighted by the steps each covers (points without a loss,
  every step of theirs non-finite, are left out; none left: null), which is the mean loss over the
  window's steps when every step was finite;
- loss_by_t: per timestep range, the same weighted mean over the points that have that entry;
- images_per_s: the window's images over its time, i.e. the steps-weighted harmonic mean;
- mfu: the same harmonic mean (it is images/s times a constant of the run, so it follows it; null
  when no point of the window has one);
- peak_memory_bytes: the window's largest (null when no point has one);
- lr and created_at: those of its last point (the learning rate at that step).
A thinned curve thinned again (a continued job that ends and ages) stays right: a merged point
covers exactly the steps since the point before it.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.jobs.repository import JobRepository
from app.metrics.repository import MetricRepository
from app.models import MetricPoint, utcnow


@dataclass(frozen=True)
class Thinned:
    """A job's metric points before and after one retention pass."""

    job_id: uuid.UUID
    before: int
    after: int


def downsample(points: list[MetricPoint], max_points: int) -> list[MetricPoint]:
    """At most `max_points` (>= 2) new points standing for `points` (in step order), as the module
    docstring says; `points` themselves when there are no more than `max_points`."""
    if len(points) <= max_points:
        return list(points)
    first, rest = points[0], points[1:]
    low, span, windows = first.step, rest[-1].step - first.step, max_points - 1
    grouped: dict[int, list[tuple[int, MetricPoint]]] = defaultdict(list)
    previous = first.step
    for point in rest:
        grouped[(point.step - low - 1) * windows // span].append((point.step - previous, point))
        previous = point.step
    merged = [_merge([first], first.step)]
    for window in sorted(grouped):
        covers = [c for c, _ in grouped[window]]
        merged.append(_merge([p for _, p in grouped[window]], *covers))
    return merged


def _merge(points: list[MetricPoint], *covers: int) -> MetricPoint:
    """One point for consecutive `points`, each covering `covers[i]` steps."""
    last = points[-1]
    return MetricPoint(
        job_id=last.job_id,
        step=last.step,
        loss=_weighted_mean([p.loss for p in points], covers),
        lr=last.lr,
        images_per_s=_harmonic_mean([p.images_per_s for p in points], covers),
        loss_by_t=_loss_by_t(points, covers),
        mfu=_mfu(points, covers),
        peak_memory_bytes=max((p.peak_memory_bytes for p in points if p.peak_memory_bytes is not None), default=None),
        created_at=last.created_at,
    )


def _weighted_mean(values: list[float | None], weights: tuple[int, ...]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _harmonic_mean(rates: list[float], weights: tuple[int, ...]) -> float:
    """Images per second over the whole window: its images (steps x batch) over its seconds."""
    pairs = [(r, w) for r, w in zip(rates, weights, strict=True) if r > 0 and w > 0]
    seconds = sum(w / r for r, w in pairs)
    return sum(w for _, w in pairs) / seconds if seconds else rates[-1]


def _mfu(points: list[MetricPoint], covers: tuple[int, ...]) -> float | None:
    """As images/s: a utilisation is images/s times the run's FLOPs per image over its peak."""
    rows = [(p.mfu, c) for p, c in zip(points, covers, strict=True) if p.mfu is not None]
    return _harmonic_mean([m for m, _ in rows], tuple(c for _, c in rows)) if rows else None


def _loss_by_t(points: list[MetricPoint], covers: tuple[int, ...]) -> list[float | None] | None:
    rows = [(p.loss_by_t, c) for p, c in zip(points, covers, strict=True) if p.loss_by_t is not None]
    if not rows:
        return None
    width = max(len(r) for r, _ in rows)
    return [
        _weighted_mean([r[i] if i < len(r) else None for r, _ in rows], tuple(c for _, c in rows)) for i in range(width)
    ]


def thin_job_metrics(session: Session, job_id: uuid.UUID, max_points: int) -> Thinned | None:
    """Downsample one finished job's points and stamp it (in the caller's transaction); None when
    the job is no longer due (continued, deleted, done by another sweeper, or held by one now)."""
    job = JobRepository(session).lock_for_downsampling(job_id)
    if job is None:
        return None
    metrics = MetricRepository(session)
    points = metrics.list(job_id)
    if len(points) > max_points:
        kept = downsample(points, max_points)
        for point in points:  # the new rows reuse some of their keys
            session.expunge(point)
        metrics.replace_all(job_id, kept)
    else:
        kept = points
    job.metrics_downsampled_at = utcnow()
    session.flush()
    return Thinned(job_id, len(points), len(kept))
