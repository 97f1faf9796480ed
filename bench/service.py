"""Benchmark 2: what the service around the loop costs.

A: a job run through the worker's `JobRunner` against a real PostgreSQL (claim, metric rows and
heartbeats every `log_every` steps, the heartbeat thread, checkpoint files and rows, final status).
B: `train()` on the same spec with a sink that does nothing (it still writes the checkpoint files).
Both are timed from start to finish (model build and data loading included on both sides), in
alternation; the ratio is A's throughput over B's. The runner's sink calls are timed as well, to
say what share of a job the database writes take.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app.auth.service import get_or_create_user
from app.config import Settings
from app.db import make_engine, make_sessionmaker, session_scope, upgrade_database
from app.jobs.service import create_job
from app.models import MetricPoint as MetricRow
from app.spec import JobSpec, TrainingSpec
from bench.common import REDIS_URL, Rounds, default_threads, machine, throwaway_database, torch_threads
from worker.database_sink import DatabaseSink
from worker.ddpm.sink import MetricPoint, SavedCheckpoint
from worker.ddpm.trainer import resolve_device, train
from worker.runner import JobRunner


def job_spec(short: bool) -> JobSpec:
    training = (
        {"steps": 20, "batch_size": 8, "log_every": 5, "checkpoint_every": 10}
        if short
        else {"steps": 120, "batch_size": 32, "log_every": 10, "checkpoint_every": 60}
    )
    if "sample_every" in TrainingSpec.model_fields:  # samples off (issue 5's sample grids)
        training["sample_every"] = 0
    return JobSpec.model_validate({"dataset": {"image_size": 16}, "model": {"preset": "tiny"}, "training": training})


class _Points:
    """The bare loop's sink: keeps the metric points, nothing else."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_log(self, point: MetricPoint) -> None:
        self.rates.append(point.images_per_s)

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        pass


class _SinkTimer:
    """Wraps DatabaseSink.on_log / on_checkpoint, while in use and in this process only, to time each call."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {"on_log": [], "on_checkpoint": []}

    def __enter__(self) -> _SinkTimer:
        self._originals = {name: getattr(DatabaseSink, name) for name in self.seconds}
        for name, original in self._originals.items():

            def timed(sink: Any, arg: Any, _original: Any = original, _name: str = name) -> None:
                start = time.perf_counter()
                try:
                    _original(sink, arg)
                finally:
                    self.seconds[_name].append(time.perf_counter() - start)

            setattr(DatabaseSink, name, timed)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._originals.items():
            setattr(DatabaseSink, name, original)


def run(short: bool = False, device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    threads = threads or default_threads(dev.type)
    spec = job_spec(short)
    cfg = spec.training
    images = cfg.steps * cfg.batch_size
    rounds_n = 1 if short else 3
    print(f"== service: a job through the worker vs the bare training loop\n   {machine()}")
    print(
        f"-- tiny, 16x16x1, batch {cfg.batch_size}, {cfg.steps} steps, metrics every {cfg.log_every}, "
        f"checkpoints every {cfg.checkpoint_every}, {dev.type}, {threads} threads, {rounds_n} rounds"
    )
    timer = _SinkTimer()
    window_rates: dict[str, list[float]] = {"through the worker": [], "bare loop": []}
    runner_walls: list[float] = []
    with throwaway_database() as url, tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        settings = Settings(
            database_url=url,
            broker_url=REDIS_URL,
            queue=f"ddpm-bench-{uuid.uuid4().hex[:8]}",
            data_dir=Path(tmp),
            checkpoint_dir=Path(tmp) / "checkpoints",
            device=dev.type,
        )
        upgrade_database(settings)
        engine = make_engine(settings)
        factory = make_sessionmaker(engine)
        runner = JobRunner(settings, factory)

        def through_worker() -> float:
            with session_scope(factory) as s:
                job_id = create_job(s, spec, owner=get_or_create_user(s, "bench"), settings=settings)[0].id
            start = time.perf_counter()
            status = runner.run(job_id)
            wall = time.perf_counter() - start
            if status != "succeeded":
                raise RuntimeError(f"benchmark job {job_id} ended {status}")
            runner_walls.append(wall)
            with session_scope(factory) as s:
                rates = s.scalars(select(MetricRow.images_per_s).where(MetricRow.job_id == job_id)).all()
            window_rates["through the worker"].append(statistics.median(rates))
            return images / wall

        def bare_loop() -> float:
            sink = _Points()
            with tempfile.TemporaryDirectory(prefix="bench-bare-", dir=tmp) as out:
                start = time.perf_counter()
                train(spec, Path(out), sink, device=str(dev))
                wall = time.perf_counter() - start
            window_rates["bare loop"].append(statistics.median(sink.rates))
            return images / wall

        with timer, torch_threads(threads):
            rounds = Rounds().run(rounds_n, {"through the worker": through_worker, "bare loop": bare_loop})
        engine.dispose()

    ratio = rounds.ratio("through the worker", "bare loop")
    window_ratio = statistics.median(window_rates["through the worker"]) / statistics.median(window_rates["bare loop"])
    print("  whole job, start to finish (images / wall-clock s):")
    print(rounds.report("images/s"))
    paired = ", ".join(f"{x:.3f}" for x in rounds.paired_ratios("through the worker", "bare loop"))
    print(f"  ratio through the worker / bare loop: {ratio:.3f} (ratio of medians; per round: {paired})")
    print(
        "  inside the loop (median of the trainer's per-window images/s): "
        f"worker {statistics.median(window_rates['through the worker']):.4g}, "
        f"bare {statistics.median(window_rates['bare loop']):.4g}, ratio {window_ratio:.3f}"
    )
    on_log, on_ckpt = timer.seconds["on_log"], timer.seconds["on_checkpoint"]
    log_share = sum(on_log) / sum(runner_walls)
    print(
        f"  DatabaseSink.on_log: {len(on_log)} calls, median {statistics.median(on_log) * 1e3:.2f} ms, "
        f"max {max(on_log) * 1e3:.2f} ms, {log_share:.2%} of the worker's wall time; "
        f"on_checkpoint: {len(on_ckpt)} calls, median {statistics.median(on_ckpt) * 1e3:.2f} ms"
    )
    return {"ratio": ratio, "window_ratio": window_ratio, "on_log_share": log_share}
