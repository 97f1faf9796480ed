"""Benchmark: training on a user's data set streamed from the host, against the same set on the device.

`tiny` at 32x32x3 over 50,000 random uint8 images (CIFAR-10's size; a 150 MB decoded array in the
np.save format the worker caches, memory-mapped), trained by `train()` itself with
`data_on_device=True` and `False` in alternating rounds. Images/s as bench/train.py measures ours:
a warm-up window, then the timed steps (on CPU the median per-step rate, on CUDA the mean over the
window). Streaming gathers each batch on the host one step ahead (worker/ddpm/data.py
`HostBatches`); the target is a ratio streamed / on-device of at least 0.95 on CPU, where both
read the same host memory, and close to 1 on CUDA, where streaming copies every batch over the bus.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.spec import JobSpec
from bench.common import Rounds, default_threads, machine, torch_threads
from bench.train import _Stopwatch
from worker.ddpm.data import BatchIndexer, HostBatches, load_images
from worker.ddpm.trainer import train

TARGET_CPU_RATIO = 0.95
CONTENDERS = {"on-device": True, "host-streamed": False}  # name -> data_on_device


@dataclass(frozen=True)
class Case:
    images: int  # in the data set
    batch: int
    steps: int  # warm-up steps, then as many timed steps
    rounds: int


def case_for(dev: torch.device, short: bool) -> Case:
    if short:  # proves the benchmark runs; says nothing about speed
        return Case(images=2_000, batch=16, steps=2, rounds=1)
    if dev.type == "cpu":  # about half a second a step with one thread
        return Case(images=50_000, batch=32, steps=8, rounds=5)
    return Case(images=50_000, batch=128, steps=100, rounds=5)


def make_spec(case: Case, steps: int, log_every: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"kind": "dataset", "id": str(uuid.uuid4()), "image_size": 32, "channels": 3},
            "model": {"preset": "tiny"},
            "training": {
                "steps": steps,
                "batch_size": case.batch,
                "log_every": log_every,
                "checkpoint_every": 10**6,  # only the last step's: after the timing
                "warmup_steps": 10,
                "sample_every": 0,
            },
        }
    )


def write_images(path: Path, count: int) -> None:
    """`count` random 32x32 RGB images, uint8 (N, 3, 32, 32), written in slices as the worker's cache is."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, 3, 32, 32))
    rng = np.random.default_rng(0)
    for start in range(0, count, 10_000):
        stop = min(count, start + 10_000)
        out[start:stop] = rng.integers(0, 256, (stop - start, 3, 32, 32), dtype=np.uint8)
    out.flush()
    del out


def images_per_s(case: Case, images_file: Path, dev: torch.device, on_device: bool) -> float:
    """train() for 2n steps: images/s of the last n, after n warm-up steps (see bench/train.py `ours`)."""
    n, per_step = case.steps, dev.type == "cpu"
    spec = make_spec(case, 2 * n, 1 if per_step else n)
    watch = _Stopwatch()
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as out:
        train(spec, Path(out), watch, device=str(dev), images_file=images_file, data_on_device=on_device)
    if per_step:
        return case.batch / statistics.median(b - a for a, b in itertools.pairwise(watch.times[n - 1 :]))
    return n * case.batch / (watch.times[1] - watch.times[0])


def gather_us(images_file: Path, batch: int, steps: int = 200) -> float:
    """Microseconds to gather one batch from the memory-mapped array on the host (the work streaming adds)."""
    spec = make_spec(Case(0, batch, 0, 0), 1, 1).dataset
    images = load_images(spec, images_file)
    host = HostBatches(images, BatchIndexer(len(images), batch, seed=0), torch.device("cpu"))
    start = time.perf_counter()
    for step in range(steps):
        host._gather(step)
    elapsed = time.perf_counter() - start
    host.close()
    return elapsed / steps * 1e6


def bench_device(dev: torch.device, short: bool, threads: int | None) -> dict[str, Any]:
    case = case_for(dev, short)
    threads = threads or default_threads(dev.type)
    with tempfile.TemporaryDirectory(prefix="bench-stream-data-") as data, torch_threads(threads):
        images_file = Path(data) / "32x32x3.npy"
        write_images(images_file, case.images)
        size_mb = images_file.stat().st_size / 2**20
        print(
            f"-- tiny, 32x32x3, {case.images:,} images ({size_mb:.0f} MB .npy), batch {case.batch}, {dev.type}, "
            f"{threads} threads, {case.steps} warm-up + {case.steps} timed steps, {case.rounds} rounds"
        )
        contenders = {name: (lambda on=on: images_per_s(case, images_file, dev, on)) for name, on in CONTENDERS.items()}
        rounds = Rounds().run(case.rounds, contenders)
        gather = gather_us(images_file, case.batch)
    print(rounds.report("images/s"))
    ratio = rounds.ratio("host-streamed", "on-device")
    paired = ", ".join(f"{x:.3f}" for x in rounds.paired_ratios("host-streamed", "on-device"))
    target = f" (target >= {TARGET_CPU_RATIO})" if dev.type == "cpu" else ""
    print(f"  ratio host-streamed / on-device: {ratio:.3f}{target} (ratio of medians; per round: {paired})")
    print(f"  gathering one batch of {case.batch} from the memory-mapped array: {gather:.0f} us")
    return {
        "images": case.images,
        "batch": case.batch,
        "images_per_s": {name: rounds.median(name) for name in CONTENDERS},
        "ratio": ratio,
        "gather_us": gather,
    }


def run(short: bool = False, device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Side by side on the CPU, and on CUDA when there is one (or only on `device` when given)."""
    print(f"== stream: host-streamed vs on-device training set\n   {machine()}")
    devices = [torch.device(device)] if device else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return {dev.type: bench_device(dev, short, threads) for dev in devices}


if __name__ == "__main__":
    run()
