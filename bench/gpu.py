"""python -m bench gpu: the checks and figures a lent GPU is for, in one run of a few minutes.

1. The CUDA path: a tiny job trains, checkpoints and resumes on the GPU (finite losses, the resumed
   run continues at the checkpoint's step and ends where the uninterrupted one does); with
   `training.compile: graphs` (CUDA graphs) its losses stay those of the eager run.
2. Throughput, ddpm-cifar10 (35.7M params, 32x32x3, batch 128): `train()` (bf16 autocast, compiled;
   and with CUDA graphs) against the plain diffusers loop in fp32 and bf16, in alternated rounds.
3. The multi-GPU code path on this GPU: one DDP rank with NCCL in a spawned process, compiled, the
   same case: images/s against the single-process run (DDP's overhead with nothing to reduce with).
4. Capacity inputs: steps/s of that case, so metric points/s = steps/s / log_every (README).

Prints as it goes and returns a dict (written as JSON by `--json`).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Rounds, machine, run_ranks
from bench.train import Case, _Stopwatch, diffusers_loop, make_spec, ours
from worker.ddpm.distributed import Ranks, process_group
from worker.ddpm.sink import MetricPoint, SavedCheckpoint
from worker.ddpm.trainer import train


class _Recorder:
    def __init__(self) -> None:
        self.points: list[MetricPoint] = []
        self.checkpoints: list[SavedCheckpoint] = []

    def on_log(self, point: MetricPoint) -> None:
        self.points.append(point)

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        self.checkpoints.append(saved)


def check_cuda_path(dev: torch.device) -> dict[str, Any]:
    spec = make_spec("tiny", 16, 1, 64).model_copy(deep=True)
    spec.training.steps, spec.training.log_every, spec.training.checkpoint_every = 40, 10, 20
    spec.training.compile = "off"
    with tempfile.TemporaryDirectory() as out:
        whole, resumed = _Recorder(), _Recorder()
        train(spec, Path(out) / "a", whole, device=str(dev))
        train(spec, Path(out) / "b", resumed, device=str(dev), resume_from=whole.checkpoints[0].path)
        graphed = _Recorder()
        graphs_spec = spec.model_copy(update={"training": spec.training.model_copy(update={"compile": "graphs"})})
        train(graphs_spec, Path(out) / "c", graphed, device=str(dev))
    losses = [p.loss for p in whole.points]
    graph_rel = max(abs(a.loss - b.loss) / abs(a.loss) for a, b in zip(whole.points, graphed.points, strict=True))
    result = {
        "graphs_losses": [p.loss for p in graphed.points],
        "graphs_max_relative_difference": graph_rel,
        "losses": losses,
        "resumed_steps": [p.step for p in resumed.points],
        "resumed_losses": [p.loss for p in resumed.points],
        "finite": all(math.isfinite(v) for v in losses),
        "learns": losses[-1] < losses[0],
    }
    shown = ", ".join(f"{v:.4f}" for v in losses)
    print(f"-- CUDA path: losses {shown}; resumed at step 20 -> points at {result['resumed_steps']}")
    print(f"   with CUDA graphs: largest relative loss difference to eager {graph_rel:.2e}")
    assert result["finite"] and result["learns"] and result["resumed_steps"] == [30, 40], result
    assert graph_rel < 0.05, result  # bf16 forward passes fused differently: close, not equal
    return result


def _ddp_rank(rank: int, spec_json: str, init_method: str, out: str) -> None:
    from app.spec import JobSpec

    ranks = Ranks(rank, 1)
    watch = _Stopwatch()
    with process_group(ranks, "cuda", init_method, timeout_s=300), tempfile.TemporaryDirectory() as ckpt:
        train(JobSpec.model_validate_json(spec_json), ckpt, watch, device="cuda:0", ranks=ranks)
    Path(out).write_text(json.dumps(watch.times))


def ddp_one_rank(case: Case) -> float:
    """images/s of the timed half of a 2n-step run on one NCCL rank (as `ours` times it)."""
    n = case.steps
    timing = {"steps": 2 * n, "log_every": n, "checkpoint_every": 10**6}
    spec = case.spec.model_copy(update={"training": case.spec.training.model_copy(update=timing)})
    times = run_ranks(_ddp_rank, spec.model_dump_json(), 1)
    return n * case.batch / (times[1] - times[0])


def run(short: bool = False, device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("bench gpu needs a CUDA device")
    dev = torch.device(device or "cuda")
    print(f"== gpu: the CUDA path, throughput, the DDP path\n   {machine()}", flush=True)
    results: dict[str, Any] = {"machine": machine(), "cuda_path": check_cuda_path(dev)}

    case = Case("ddpm-cifar10", make_spec("ddpm-cifar10", 32, 3, 128), steps=10 if short else 60, rounds=2)
    start = time.perf_counter()
    first = ours(case, dev)  # compiles (and fills the compile cache the later runs use)
    print(f"-- ddpm-cifar10 batch 128: first compiled run {first:.0f} images/s ({time.perf_counter() - start:.0f} s)")
    graphs = Case(case.name, case.spec.model_copy(deep=True), case.steps, case.rounds)
    graphs.spec.training.compile = "graphs"
    contenders = {
        "ddpm-jobs": lambda: ours(case, dev),
        "ddpm-jobs graphs": lambda: ours(graphs, dev),
        "diffusers fp32": lambda: diffusers_loop(case, dev),
        "diffusers bf16": lambda: diffusers_loop(case, dev, bf16=True),
        "ddpm-jobs DDP 1 rank (NCCL)": lambda: ddp_one_rank(case),
    }
    rounds = Rounds().run(1 if short else case.rounds, contenders)
    print(rounds.report("images/s"), flush=True)
    medians = {name: rounds.median(name) for name in contenders}
    ratios = {name: rounds.ratio("ddpm-jobs", name) for name in contenders if name != "ddpm-jobs"}
    for name, ratio in ratios.items():
        print(f"  ratio ddpm-jobs / {name}: {ratio:.3f}")
    steps_per_s = medians["ddpm-jobs"] / case.batch
    print(f"  steps/s {steps_per_s:.1f} -> metric points/s at log_every=10: {steps_per_s / 10:.2f}")
    results["ddpm-cifar10"] = {"images_per_s": medians, "ratios": ratios, "steps_per_s": steps_per_s}
    return results
