"""Benchmark 5: what DistributedDataParallel costs, on the CPU with gloo.

Three contenders train the same tiny job (global batch 16), each in a freshly spawned process with
one torch thread per process, in alternated rounds:
- `1 process`: `train()` without a process group (what a single-GPU job runs);
- `1 rank (DDP)`: the same under DDP in a process group of one (what each rank of a multi-GPU job
  pays on top of its share of the work: the reducer's hooks and buckets, the collectives);
- `2 ranks (DDP)`: each rank takes 8 images of every global batch.
Figures: the median over rounds of each contender's median metric window (images/s, the first
windows dropped as warm-up), the one-rank overhead in %, and the loss curves' largest relative
difference to the single process (the figure the multi-GPU tests bound). Both ranks of the
2-rank run share this machine's cores, so its speed says nothing about scaling over GPUs.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from app.spec import JobSpec
from bench.common import Rounds, machine, run_ranks
from worker.ddpm import distributed
from worker.ddpm.distributed import Ranks, process_group
from worker.ddpm.sink import MetricPoint, SavedCheckpoint
from worker.ddpm.trainer import train

# name: (processes, under DDP)
CONTENDERS = {"1 process": (1, False), "1 rank (DDP)": (1, True), "2 ranks (DDP)": (2, True)}
WARMUP_WINDOWS = 2  # metric windows left out of the rate: the first steps allocate and warm caches


class _Points:
    def __init__(self) -> None:
        self.points: list[MetricPoint] = []

    def on_log(self, point: MetricPoint) -> None:
        self.points.append(point)

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        pass

    def on_event(self, event: Any) -> None:
        pass


def _contender(rank: int, job_json: str, init_method: str, out: str) -> None:
    """One process of a contender: `job` = {"spec", "world_size", "ddp", and optionally
    "ddp_options" (overrides of distributed.DDP_OPTIONS, for trying options side by side)}."""
    job = json.loads(job_json)
    spec = JobSpec.model_validate(job["spec"])
    distributed.DDP_OPTIONS.update(job.get("ddp_options") or {})
    sink = _Points()
    with tempfile.TemporaryDirectory() as ckpt:
        if job["ddp"]:
            ranks = Ranks(rank, job["world_size"])
            with process_group(ranks, "cpu", init_method, timeout_s=600):
                torch.set_num_threads(1)  # after process_group, which splits the cores between ranks
                train(spec, ckpt, sink, device="cpu", ranks=ranks)
        else:
            torch.set_num_threads(1)
            train(spec, ckpt, sink, device="cpu")
    if rank == 0:
        rates = [p.images_per_s for p in sink.points[WARMUP_WINDOWS:]]
        Path(out).write_text(json.dumps({"losses": [p.loss for p in sink.points], "images_per_s": rates}))


def measure(spec: JobSpec, name: str, ddp_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run of contender `name` in fresh processes: its losses and per-window images/s."""
    world_size, ddp = CONTENDERS[name]
    job = {"spec": spec.model_dump(mode="json"), "world_size": world_size, "ddp": ddp, "ddp_options": ddp_options}
    return run_ranks(_contender, json.dumps(job), world_size)


def job_spec(steps: int, log_every: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"image_size": 8},
            "model": {"preset": "custom", "channels": [16, 32], "norm_groups": 8},
            "diffusion": {"timesteps": 50},
            "training": {
                "steps": steps,
                "batch_size": 16,
                "log_every": log_every,
                "checkpoint_every": 10**6,
                "sample_every": 0,
            },
            "resources": {"gpus": 2},  # train() takes its ranks from the caller; the spec must allow 2
        }
    )


def largest_relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def run(short: bool = False, device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    steps, log_every, n_rounds = (30, 5, 1) if short else (200, 10, 5)
    spec = job_spec(steps, log_every)
    print(f"== ddp: 1 process, 1 DDP rank, 2 DDP ranks (gloo, CPU), global batch 16, {steps} steps\n   {machine()}")
    print(f"   DDP options: {distributed.DDP_OPTIONS}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}

    def contender(name: str) -> Any:
        def once() -> float:
            result = measure(spec, name)
            runs[name].append(result)
            return statistics.median(result["images_per_s"])

        return once

    rounds = Rounds().run(n_rounds, {name: contender(name) for name in CONTENDERS})
    print(rounds.report("images/s"))
    losses = {name: results[0]["losses"] for name, results in runs.items()}
    overhead = 1 - rounds.ratio("1 rank (DDP)", "1 process")
    paired = [1 - r for r in rounds.paired_ratios("1 rank (DDP)", "1 process")]
    results = {
        "max_relative_loss_difference": largest_relative_difference(losses["1 process"], losses["2 ranks (DDP)"]),
        "one_rank_max_relative_loss_difference": largest_relative_difference(
            losses["1 process"], losses["1 rank (DDP)"]
        ),
        "images_per_s": {name: rounds.median(name) for name in CONTENDERS},
        "one_rank_overhead": overhead,
        "one_rank_overhead_per_round": paired,
        "first_last_loss": [losses["1 process"][0], losses["1 process"][-1]],
        "ddp_options": dict(distributed.DDP_OPTIONS),
    }
    first, last = results["first_last_loss"]
    print(f"  loss {first:.4f} -> {last:.4f} over {len(losses['1 process'])} points")
    for label, key in (("2-rank", "max_relative_loss_difference"), ("1-rank", "one_rank_max_relative_loss_difference")):
        print(f"  largest relative difference of the {label} loss curve: {results[key]:.2e}")
    per_round = ", ".join(f"{p:.1%}" for p in paired)
    print(f"  one-rank DDP overhead: {overhead:.1%} (ratio of medians; per round: {per_round})")
    return results
