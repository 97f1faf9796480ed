"""Which Celery queue a job goes to, and which queues a worker consumes.

A job needs `resources.gpus` GPUs with about m GiB each (app/spec_size.py's estimate for its
share of the global batch, or for one micro-batch of it when training.micro_batch is set). Its
queue says so: ``<DDPM_QUEUE>.gpus-<k>.mem-<c>``, where c is m rounded up to whole GiB up to 4,
and to a multiple of `MEMORY_STEP_GIB` above. A worker with N GPUs of M GiB consumes every queue
with k <= N and c <= M, so a job only ever reaches a worker that can hold it, and Celery with
Redis spreads the jobs over all such workers, on any host. Workers also record what they hold in
the `workers` table, which is how the API tells a user why a job is still waiting. Sample
requests go to ``<DDPM_QUEUE>.samples`` (`sample_queue`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.spec import JobSpec
from app.spec_size import training_memory_bytes

MEMORY_STEP_GIB = 4


@dataclass(frozen=True)
class Resources:
    gpus: int
    memory_gib: float  # per GPU

    def describe(self) -> str:
        return f"{self.gpus} GPU{'s' if self.gpus > 1 else ''} with {self.memory_gib:g} GiB each"


def memory_class(gib: float) -> int:
    """The queue's memory figure in GiB: 1, 2, 3, 4, then multiples of MEMORY_STEP_GIB (8, 12, ...)."""
    if gib <= MEMORY_STEP_GIB:
        return max(1, math.ceil(gib))
    return math.ceil(gib / MEMORY_STEP_GIB) * MEMORY_STEP_GIB


def memory_classes(up_to_gib: float) -> list[int]:
    """Every class a GPU of `up_to_gib` GiB can hold, largest first."""
    small = range(1, min(int(up_to_gib), MEMORY_STEP_GIB) + 1)
    large = range(2 * MEMORY_STEP_GIB, int(up_to_gib) + 1, MEMORY_STEP_GIB)
    return sorted([*small, *large], reverse=True)


def job_resources(spec: JobSpec) -> Resources:
    """What training the job takes: its GPUs, and the estimated memory on each."""
    return Resources(spec.resources.gpus, memory_class(training_memory_bytes(spec) / 2**30))


def queue_name(base: str, needs: Resources) -> str:
    return f"{base}.gpus-{needs.gpus}.mem-{memory_class(needs.memory_gib)}"


def train_queue(base: str, spec: JobSpec) -> str:
    return queue_name(base, job_resources(spec))


def sample_queue(base: str) -> str:
    """On-demand samples have a queue of their own: every worker consumes it, and so does a light
    samples-only worker (DDPM_WORKER_ROLE=samples), so a request is drawn beside training instead
    of waiting for it."""
    return f"{base}.samples"


def can_hold(capacity: Resources, needs: Resources) -> bool:
    return needs.gpus <= capacity.gpus and memory_class(needs.memory_gib) <= capacity.memory_gib


def worker_queues(base: str, capacity: Resources) -> list[str]:
    """Every queue a worker with `capacity` can serve, the largest jobs first."""
    classes = memory_classes(capacity.memory_gib)
    return [queue_name(base, Resources(k, c)) for k in range(capacity.gpus, 0, -1) for c in classes]
