"""How well a run uses its GPU: model FLOP utilisation (MFU) and peak memory, for each metric point.

MFU = images/s x the FLOPs one image costs a training step / what the GPUs could do at their dense
bf16 tensor-core peak. The FLOPs are counted once per run by `torch.utils.flop_counter` over one
forward and backward pass of the job's U-Net built on the meta device (shapes only: no memory, no
compute, no draw from the RNG), so they are the network's matmuls, convolutions and attention, not
the elementwise work around them (the usual convention, as in the PaLM paper's MFU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from app.spec import JobSpec
from worker.ddpm.model import build_unet

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name in order (the first match wins: "A100" before "A10"). A GPU not listed
# here gets no MFU unless the worker is told its peak (DDPM_PEAK_TFLOPS).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bB200\b", 2250.0),
    (r"\bH200\b", 989.0),
    (r"\bGH200\b", 989.0),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10G\b", 70.0),
    (r"\bA10\b", 125.0),
    (r"\bRTX 4090\b", 165.0),
    (r"\bRTX 3090\b", 71.0),
    (r"\bMI300X\b", 1307.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops * 1e12
    return None


def training_flops_per_image(spec: JobSpec) -> float:
    """FLOPs of one image's forward and backward pass through the job's U-Net (see the module docstring)."""
    size, channels = spec.dataset.image_size, spec.dataset.channels
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        unet = build_unet(spec).train()
        x_t = torch.zeros(1, channels, size, size)
        t = torch.zeros(1, dtype=torch.int64)
        with FlopCounterMode(display=False) as counter:
            unet(x_t, t, return_dict=False)[0].float().square().mean().backward()
    return float(counter.get_total_flops())


@dataclass(frozen=True)
class Efficiency:
    """What rank 0 adds to each metric point: MFU (when the GPU's peak is known) and peak GPU memory."""

    dev: torch.device
    flops_per_image: float | None  # None: MFU is not reported
    peak_flops: float | None  # of all the job's GPUs together

    @classmethod
    def measure(
        cls, spec: JobSpec, dev: torch.device, peak_flops: float | None = None, world_size: int = 1
    ) -> Efficiency:
        """`peak_flops`: one GPU's peak when the caller knows it (else the table's; the CPU has
        none unless given one). Starts the peak-memory count of the run."""
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            peak_flops = peak_flops or peak_bf16_flops(torch.cuda.get_device_name(dev))
        if not peak_flops:
            return cls(dev, None, None)
        return cls(dev, training_flops_per_image(spec), peak_flops * world_size)

    def mfu(self, images_per_s: float) -> float | None:
        if self.flops_per_image is None or self.peak_flops is None or not images_per_s > 0:
            return None
        return images_per_s * self.flops_per_image / self.peak_flops

    def peak_memory_bytes(self) -> int | None:
        """The most memory the run's tensors have held on the GPU so far (no device sync: allocator counters)."""
        return torch.cuda.max_memory_allocated(self.dev) if self.dev.type == "cuda" else None
