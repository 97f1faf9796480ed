"""Benchmark 1: images/s of our training step against a plain diffusers loop, same U-Net, same batch.

The baseline is what a user of diffusers' `train_unconditional.py` gets without flags:
`UNet2DModel` + `DDPMScheduler.add_noise` + MSE + `torch.optim.AdamW` (its defaults), fp32, no
compile, `loss.item()` every step (the script logs it each step); on CUDA a second baseline runs
the same loop under bf16 autocast (accelerate's `--mixed_precision bf16`). The data set sits on the
device for the baseline too (the script's DataLoader would cost it more). Ours is `train()` itself,
timed by its metric points after a warm-up window: EMA, gradient clipping and the non-finite
checks included, which the baseline does not do. On CPU both sides report their median step
(the machine is shared); on CUDA the mean over the timed steps.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from app.spec import JobSpec
from bench.common import Rounds, default_threads, machine, torch_threads
from worker.ddpm.data import load_images
from worker.ddpm.model import build_unet, count_parameters, unet_config
from worker.ddpm.sink import MetricPoint, SavedCheckpoint, TrainingEvent
from worker.ddpm.trainer import resolve_device, train

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name substring.
BF16_PEAK = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


@dataclass(frozen=True)
class Case:
    name: str
    spec: JobSpec
    steps: int  # warm-up steps, then as many timed steps
    rounds: int

    @property
    def batch(self) -> int:
        return self.spec.training.batch_size


def make_spec(preset: str, image_size: int, channels: int, batch: int, compile_mode: str = "auto") -> JobSpec:
    return JobSpec.model_validate(
        {
            "dataset": {"kind": "digits", "image_size": image_size, "channels": channels},
            "model": {"preset": preset},
            "training": {"batch_size": batch, "warmup_steps": 10, "compile": compile_mode, "sample_every": 0},
            # ddpm-cifar10's default evaluates 5,000 samples at the last step: off the clock, but minutes of wall time.
            "evaluation": {"every": 0},
        }
    )


def cases(short: bool, dev: torch.device) -> list[Case]:
    if short:  # proves the benchmark works; says nothing about speed
        return [Case("tiny", make_spec("tiny", 16, 1, 16), steps=2, rounds=1)]
    if dev.type == "cpu":  # batch 128 of ddpm-cifar10 takes ~20 s a step on this CPU: 16 instead
        return [
            Case("tiny", make_spec("tiny", 16, 1, 64), steps=6, rounds=5),
            Case("ddpm-cifar10", make_spec("ddpm-cifar10", 32, 3, 16), steps=2, rounds=3),
        ]
    return [
        Case("tiny", make_spec("tiny", 16, 1, 128), steps=50, rounds=5),
        Case("ddpm-cifar10", make_spec("ddpm-cifar10", 32, 3, 128), steps=30, rounds=3),
    ]


class _Stopwatch:
    """A sink that notes when each metric point arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_log(self, point: MetricPoint) -> None:
        self.times.append(time.perf_counter())

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        pass

    def on_event(self, event: TrainingEvent) -> None:
        print(f"   event: {event.message}")  # a fallback (compile, CUDA graph) changes what is timed


def ours(case: Case, dev: torch.device) -> float:
    """train() for 2n steps: images/s of the last n, after n warm-up steps.

    On CPU, one metric point per step and the median of the per-step rates (robust to the bursts
    of other people's load on a shared machine; a host read per step costs nothing on a CPU). On
    CUDA, one point after the warm-up and one at the end: per-step reads would stall the GPU.
    """
    n = case.steps
    per_step = dev.type == "cpu"
    timing = {"steps": 2 * n, "log_every": 1 if per_step else n, "checkpoint_every": 10**6}
    spec = case.spec.model_copy(update={"training": case.spec.training.model_copy(update=timing)})
    watch = _Stopwatch()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        train(spec, out, watch, device=str(dev))  # the last step also writes a checkpoint: after the timing
    if per_step:
        return case.batch / statistics.median(b - a for a, b in itertools.pairwise(watch.times[n - 1 :]))
    return n * case.batch / (watch.times[1] - watch.times[0])


def diffusers_loop(case: Case, dev: torch.device, *, bf16: bool = False) -> float:
    """The plain reference loop: n warm-up steps, then n timed steps."""
    from diffusers import DDPMScheduler, UNet2DModel

    spec, n, batch = case.spec, case.steps, case.batch
    images = load_images(spec.dataset).to(dev)  # (N, C, H, W) uint8
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config(spec)).to(dev).train()
    scheduler = DDPMScheduler(num_train_timesteps=spec.diffusion.timesteps, beta_schedule="linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=spec.training.learning_rate)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> float:
        clean = images[torch.randint(0, len(images), (batch,), device=dev)].float() / 127.5 - 1  # (B, C, H, W)
        noise = torch.randn_like(clean)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=dev)
        noisy = scheduler.add_noise(clean, noise, t)
        with autocast:
            prediction = unet(noisy, t).sample
        loss = F.mse_loss(prediction.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    for _ in range(n):
        step()
    times = [time.perf_counter()]
    for _ in range(n):
        step()  # .item() waits for the step: no extra synchronisation needed
        times.append(time.perf_counter())
    if dev.type == "cpu":  # the median step, as for ours
        return batch / statistics.median(b - a for a, b in itertools.pairwise(times))
    return n * batch / (times[-1] - times[0])


def training_flops_per_image(spec: JobSpec, dev: torch.device) -> float:
    """FLOPs of one image's forward + backward (matmuls, convolutions, attention), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(spec).to(dev)
    x = torch.randn(2, spec.dataset.channels, spec.dataset.image_size, spec.dataset.image_size, device=dev)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.zeros(2, dtype=torch.long, device=dev)).sample.square().mean().backward()
    return counter.get_total_flops() / 2


def bf16_peak(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    name = torch.cuda.get_device_name(dev)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def run(short: bool = False, device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    threads = threads or default_threads(dev.type)
    print(f"== train: our training step vs a plain diffusers loop\n   {machine()}")
    results: dict[str, Any] = {}
    with torch_threads(threads):
        for case in cases(short, dev):
            params = count_parameters(build_unet(case.spec)) / 1e6
            d = case.spec.dataset
            shape = f"{d.image_size}x{d.image_size}x{d.channels}"
            print(
                f"-- {case.name} ({params:.1f}M params), {shape}, batch {case.batch}, {dev.type}, {threads} threads, "
                f"{case.steps} warm-up + {case.steps} timed steps, {case.rounds} rounds"
            )
            contenders = {
                "ddpm-jobs": lambda c=case: ours(c, dev),
                "diffusers fp32": lambda c=case: diffusers_loop(c, dev),
            }
            if dev.type == "cuda":
                contenders["diffusers bf16"] = lambda c=case: diffusers_loop(c, dev, bf16=True)
            rounds = Rounds().run(case.rounds, contenders)
            print(rounds.report("images/s"))
            ratios = {b: rounds.ratio("ddpm-jobs", b) for b in contenders if b != "ddpm-jobs"}
            for b, r in ratios.items():
                paired = ", ".join(f"{x:.2f}" for x in rounds.paired_ratios("ddpm-jobs", b))
                print(f"  ratio ddpm-jobs / {b}: {r:.3f} (ratio of medians; per round: {paired})")
            flops = training_flops_per_image(case.spec, dev)
            line = f"  training FLOPs per image (fwd+bwd, matmul/conv/attention): {flops / 1e9:.2f} GFLOP"
            peak = bf16_peak(dev)
            if peak:
                share = rounds.median("ddpm-jobs") * flops / peak
                line += f"; ddpm-jobs uses {share:.1%} of the {torch.cuda.get_device_name(dev)} bf16 peak"
            print(line)
            results[case.name] = {"images_per_s": {k: rounds.median(k) for k in contenders}, "ratios": ratios}
    return results
