"""Benchmark 5: a 2-rank DDP job (gloo, CPU) against one process with the same global batch and seed.

The loss curves' largest relative difference (the figure the multi-GPU tests bound), and images/s
of each. On a CPU both sides share the same cores, so the speed ratio says nothing about scaling
over GPUs; it shows what the ranks' synchronisation costs where nothing runs in parallel.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from app.spec import JobSpec
from bench.common import machine, run_ranks, torch_threads
from worker.ddpm.distributed import Ranks, process_group
from worker.ddpm.sink import MetricPoint, SavedCheckpoint
from worker.ddpm.trainer import train


class _Points:
    def __init__(self) -> None:
        self.points: list[MetricPoint] = []

    def on_log(self, point: MetricPoint) -> None:
        self.points.append(point)

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        pass


def _rank(rank: int, spec_json: str, init_method: str, out: str) -> None:
    ranks, sink = Ranks(rank, 2), _Points()
    with process_group(ranks, "cpu", init_method, timeout_s=600), tempfile.TemporaryDirectory() as ckpt:
        start = time.perf_counter()
        train(JobSpec.model_validate_json(spec_json), ckpt, sink, device="cpu", ranks=ranks)
        seconds = time.perf_counter() - start
    if ranks.is_main:
        Path(out).write_text(json.dumps({"losses": [p.loss for p in sink.points], "seconds": seconds}))


def run(short: bool = False, device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    steps = 20 if short else 200
    spec = JobSpec.model_validate(
        {
            "dataset": {"image_size": 8},
            "model": {"preset": "custom", "channels": [16, 32], "norm_groups": 8},
            "diffusion": {"timesteps": 50},
            "training": {
                "steps": steps,
                "batch_size": 16,
                "log_every": 10,
                "checkpoint_every": 10**6,
                "sample_every": 0,
            },
            "resources": {"gpus": 2},
        }
    )
    print(f"== ddp: 2 gloo ranks vs 1 process, global batch 16, {steps} steps\n   {machine()}")
    single = _Points()
    with torch_threads(1), tempfile.TemporaryDirectory() as ckpt:
        one = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus": 1})})
        start = time.perf_counter()
        train(one, ckpt, single, device="cpu")
        single_s = time.perf_counter() - start
    ranks = run_ranks(_rank, spec.model_dump_json(), 2)
    losses = [p.loss for p in single.points]
    rel = [abs(a - b) / abs(a) for a, b in zip(losses, ranks["losses"], strict=True)]
    results = {
        "max_relative_loss_difference": max(rel),
        "images_per_s": {"1 process": steps * 16 / single_s, "2 ranks": steps * 16 / ranks["seconds"]},
        "first_last_loss": [losses[0], losses[-1]],
    }
    print(f"  loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} points")
    print(f"  largest relative difference of the 2-rank loss curve: {max(rel):.2e}")
    rates = results["images_per_s"]
    print(f"  images/s: 1 process {rates['1 process']:.0f}, 2 ranks {rates['2 ranks']:.0f} (CPU; not a scaling figure)")
    return results
