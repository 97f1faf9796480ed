"""What this worker offers: how many GPUs, and how much memory each (app/routing.py).

A CUDA worker offers its devices' memory. A CPU worker trains in host memory, so it offers what
the host (or its container's memory limit) really has, less a margin for the system and the
worker itself, shared among its processes: offering more lets it take jobs it cannot hold.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

from app.config import Settings
from app.routing import Resources

log = logging.getLogger(__name__)

# A CPU worker keeps back this share of the host's memory, and at least MIN_MARGIN_GIB.
MARGIN_FRACTION = 0.1
MIN_MARGIN_GIB = 2.0
# A container's memory limit: cgroup v2, then v1 (v1 reports a huge number when unlimited).
CGROUP_LIMIT_FILES = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def detect_capacity(settings: Settings) -> tuple[Resources, str]:
    """(GPUs and GiB per GPU, device type). The visible CUDA devices (CUDA_VISIBLE_DEVICES) and the
    smallest one's memory rounded up to whole GiB; without CUDA, one CPU "GPU" (process) sharing
    the host's memory (`cpu_memory_offer_gib`). DDPM_WORKER_GPUS and DDPM_WORKER_GPU_MEMORY_GB
    override either."""
    import torch

    use_cuda = device_type(settings) == "cuda"
    if use_cuda:
        found = torch.cuda.device_count()
        memory = min(math.ceil(torch.cuda.get_device_properties(i).total_memory / 2**30) for i in range(found))
        gpus = settings.worker_gpus or found
        if gpus > found:
            log.warning("DDPM_WORKER_GPUS=%d but only %d CUDA devices are visible; offering %d", gpus, found, found)
            gpus = found
    else:
        gpus = settings.worker_gpus or 1
        memory = cpu_memory_offer_gib(host_memory_bytes() / 2**30, gpus)
    capacity = Resources(gpus, settings.worker_gpu_memory_gb or memory)
    return capacity, "cuda" if use_cuda else "cpu"


def device_type(settings: Settings) -> str:
    """What this worker trains on, "cuda" or "cpu" (DDPM_DEVICE; "auto": CUDA when there is one)."""
    if settings.device != "auto":
        return "cuda" if settings.device.startswith("cuda") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_memory_offer_gib(host_gib: float, processes: int) -> float:
    """Whole GiB each of `processes` may use of `host_gib`, after the margin; at least 1."""
    usable = host_gib - max(MIN_MARGIN_GIB, host_gib * MARGIN_FRACTION)
    return float(max(1, math.floor(usable / processes)))


def host_memory_bytes(limit_files: tuple[Path, ...] = CGROUP_LIMIT_FILES) -> int:
    """The physical memory the OS reports, or the container's memory limit where that is lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in limit_files:
        try:
            text = path.read_text().strip()
        except OSError:  # no such cgroup file on this system
            continue
        if text.isdigit():
            return min(physical, int(text))
    return physical
