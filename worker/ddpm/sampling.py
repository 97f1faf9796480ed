"""Sampling via diffusers: the full DDPM reverse chain (Ho et al. 2020, Algorithm 2), DDIM
(Song et al. 2021, eta = 0) or DPM-Solver++ 2M (Lu et al. 2022) over fewer steps, with the job's
schedule and parameterisation."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin, UNet2DModel
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


Sampler = Literal["ddpm", "ddim", "dpm++"]
SAMPLERS: tuple[Sampler, ...] = ("ddpm", "ddim", "dpm++")


def sampling_scheduler(spec: JobSpec, sampler: Sampler, steps: int | None) -> SchedulerMixin:
    """The diffusers scheduler `sampler` names, built from the job's DDPM config and set to its steps.

    `ddpm`: all T steps. `ddim`: `steps` (default 50) deterministic steps (eta = 0). `dpm++`:
    DPM-Solver++ 2M (Lu et al. 2022, Algorithm 2: second-order multistep on the data prediction,
    which diffusers converts from x0, eps or v as `prediction_type` says), `steps` (default 20)
    from t = T-1 (linspace spacing), first order at the last steps (`lower_order_final`), down to
    sigma 0. DPM-Solver has no variance type of its own to take from DDPM's `fixed_small`.
    """
    scheduler = make_scheduler(spec)
    timesteps = spec.diffusion.timesteps
    if sampler == "ddpm":
        return scheduler
    if sampler == "ddim":
        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(min(steps or 50, timesteps))
        return ddim
    if sampler == "dpm++":
        dpm = DPMSolverMultistepScheduler.from_config(
            scheduler.config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            timestep_spacing="linspace",
            variance_type=None,
        )
        dpm.set_timesteps(min(steps or 20, timesteps))
        return dpm
    raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(map(repr, SAMPLERS))}")


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

    `ddpm` runs all T steps; `ddim` and `dpm++` run `steps` (default 50, 20) deterministic steps
    (`sampling_scheduler`). Only the seeded generator is drawn from: the global RNG (training's
    dropout) is left untouched.
    `progress(done, total)` is called after each denoising step.
    """
    dev = torch.device(device)
    size, channels = spec.dataset.image_size, spec.dataset.channels
    scheduler = sampling_scheduler(spec, sampler, steps)
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
