"""What this worker offers: how many GPUs, and how much memory each (app/routing.py)."""

from __future__ import annotations

import logging
import math
import os
import socket

from app.config import Settings
from app.routing import Resources

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def detect_capacity(settings: Settings) -> tuple[Resources, str]:
    """(GPUs and GiB per GPU, device type). The visible CUDA devices (CUDA_VISIBLE_DEVICES) and the
    smallest one's memory rounded up to whole GiB; without CUDA, one CPU "GPU" with
    DDPM_GPU_MEMORY_GB. DDPM_WORKER_GPUS and DDPM_WORKER_GPU_MEMORY_GB override either."""
    import torch

    use_cuda = settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        found = torch.cuda.device_count()
        memory = min(math.ceil(torch.cuda.get_device_properties(i).total_memory / 2**30) for i in range(found))
        gpus = settings.worker_gpus or found
        if gpus > found:
            log.warning("DDPM_WORKER_GPUS=%d but only %d CUDA devices are visible; offering %d", gpus, found, found)
            gpus = found
    else:
        memory, gpus = settings.gpu_memory_gb, settings.worker_gpus or 1
    capacity = Resources(gpus, settings.worker_gpu_memory_gb or memory)
    return capacity, "cuda" if use_cuda else "cpu"
