"""Sampling via diffusers: the full DDPM reverse chain (Ho et al. 2020, Algorithm 2), or DDIM
(Song et al. 2021, eta = 0) over fewer steps, with the job's schedule and parameterisation."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image

from app.files import atomic_write
from app.spec import JobSpec
from worker.ddpm.data import to_uint8
from worker.ddpm.schedule import NoiseSchedule


def make_scheduler(spec: JobSpec) -> DDPMScheduler:
    """A diffusers DDPMScheduler with the spec's betas and parameterisation, set to the full T-step chain."""
    scheduler = DDPMScheduler(**NoiseSchedule(spec.diffusion).to_diffusers_scheduler_config())
    scheduler.set_timesteps(spec.diffusion.timesteps)  # t = T-1, ..., 0
    return scheduler


Sampler = Literal["ddpm", "ddim"]


@torch.no_grad()
def sample_images(
    unet: UNet2DModel,
    spec: JobSpec,
    count: int,
    seed: int,
    device: torch.device | str = "cpu",
    *,
    sampler: Sampler = "ddpm",
    steps: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """`count` images in [-1, 1], shape (count, C, H, W), from x_T ~ N(0, I) down to x_0.

    `ddpm` runs all T steps; `ddim` runs `steps` (default 50) deterministic steps. Only the
    seeded generator is drawn from: the global RNG (training's dropout) is left untouched.
    `progress(done, total)` is called after each denoising step.
    """
    dev = torch.device(device)
    size, channels = spec.dataset.image_size, spec.dataset.channels
    scheduler: DDPMScheduler | DDIMScheduler = make_scheduler(spec)
    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(scheduler.config)
        scheduler.set_timesteps(min(steps or 50, spec.diffusion.timesteps))
    elif sampler != "ddpm":
        raise ValueError(f"unknown sampler {sampler!r}; valid: 'ddpm', 'ddim'")
    generator = torch.Generator(dev).manual_seed(seed)
    unet = unet.to(dev).eval()
    x = torch.randn((count, channels, size, size), generator=generator, device=dev)  # x_T, (B, C, H, W)
    for done, t in enumerate(scheduler.timesteps, start=1):
        model_output = unet(x, t).sample  # (B, C, H, W): x0, eps or v, as trained
        x = scheduler.step(model_output, t, x, generator=generator).prev_sample  # x_{t-1}, (B, C, H, W)
        if progress is not None:
            progress(done, len(scheduler.timesteps))
    return x.clamp(-1, 1)


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one Pillow image (L for C=1, RGB for C=3)."""
    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pixels = to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    grid = np.zeros((rows * (h + padding) + padding, columns * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(pixels):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return Image.fromarray(grid[:, :, 0] if c == 1 else grid)


def save_grid_png(images: torch.Tensor, path: Path | str, columns: int | None = None) -> str:
    """Write the images as one PNG grid, atomically; returns its sha256."""
    buffer = io.BytesIO()
    image_grid(images, columns).save(buffer, format="PNG")
    return atomic_write(path, buffer.getvalue())
