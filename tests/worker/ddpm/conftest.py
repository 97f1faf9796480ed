"""Fixtures for the ML core tests: tiny specs (8x8 digits, small batches) and a recording sink."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from app.spec import JobSpec
from worker.ddpm.sink import (
    EvaluationPoint,
    MetricPoint,
    SavedCheckpoint,
    SavedSample,
    StopReason,
    StopTraining,
    TrainingEvent,
)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Any:
    """One intra-op thread: as fast for 8x8 images, and immune to the 100x slowdown of OpenMP
    spin-waiting when another test process trains on the same cores at the same time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY: dict[str, Any] = {
    "dataset": {"image_size": 8},
    "model": {"preset": "custom", "channels": [16, 32], "norm_groups": 8},
    "diffusion": {"timesteps": 50},
    "training": {
        "steps": 6,
        "batch_size": 8,
        "warmup_steps": 2,
        "log_every": 1,
        "checkpoint_every": 3,
        "sample_every": 0,
    },
}


@pytest.fixture
def tiny_spec() -> Callable[..., JobSpec]:
    """`tiny_spec(training={"steps": 4})` -> a JobSpec small enough to train in well under a second."""

    def make(**override: Any) -> JobSpec:
        return JobSpec.model_validate(_merge(TINY, override))

    return make


@dataclass
class RecordingSink:
    """Records what the trainer reports; raises StopTraining at a chosen step if asked."""

    stop_on_log_at: int | None = None
    stop_on_checkpoint_at: int | None = None
    stop_reason: StopReason = StopReason.fenced  # why on_log stops it (shutdown, cancelled: checkpoint first)
    points: list[MetricPoint] = field(default_factory=list)
    checkpoints: list[SavedCheckpoint] = field(default_factory=list)
    evaluations: list[EvaluationPoint] = field(default_factory=list)
    events: list[TrainingEvent] = field(default_factory=list)

    def on_log(self, point: MetricPoint) -> None:
        self.points.append(point)
        if point.step == self.stop_on_log_at:
            raise StopTraining(self.stop_reason)

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        self.checkpoints.append(saved)
        if saved.step == self.stop_on_checkpoint_at:
            raise StopTraining(StopReason.cancelled)

    def on_sample(self, saved: SavedSample) -> None:
        pass  # grids are tested in test_sample_grids.py (TINY draws none)

    def on_evaluation(self, point: EvaluationPoint) -> None:
        self.evaluations.append(point)  # TINY evaluates nothing (evaluation.every 0)

    def on_event(self, event: TrainingEvent) -> None:
        self.events.append(event)


@pytest.fixture
def make_sink() -> type[RecordingSink]:
    """`make_sink(stop_on_log_at=3)` -> a fresh RecordingSink (test modules cannot import conftest)."""
    return RecordingSink
