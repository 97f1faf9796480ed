"""The forward (noising) process of DDPM: betas, cumulative alphas, x_t and training targets.

Betas and their products are computed in float64 (tiny betas lose digits in float32 products),
then kept as float32 lookup tables on the training device.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import torch

from app.spec import DiffusionSpec, Prediction

COSINE_OFFSET = 0.008  # s in eq. 17 of Nichol & Dhariwal 2021: keeps beta_1 from being vanishingly small
MAX_BETA = 0.999  # Nichol & Dhariwal 2021 §3.2: clip betas to avoid a singularity at t = T


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Ho et al. 2020 §4: betas rising linearly from beta_start to beta_end. Shape (T,), float64."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = COSINE_OFFSET, max_beta: float = MAX_BETA) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: abar(t) = f(t) / f(0), f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2.

    beta_t = 1 - abar(t) / abar(t-1), clipped at max_beta. Shape (T,), float64.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps  # t/T for t = 0..T, (T+1,)
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
    alpha_bar = f / f[0]  # (T+1,)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]  # (T,)
    return betas.clamp(max=max_beta)


def _expand(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather one scalar per image and shape it to broadcast against `like`: (B,) -> (B, 1, 1, 1)."""
    return values[t].reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class NoiseSchedule:
    """q(x_t | x_0) for a `DiffusionSpec`: lookup tables indexed by integer timesteps 0..T-1."""

    def __init__(self, spec: DiffusionSpec) -> None:
        self.spec = spec
        self.timesteps = spec.timesteps
        self.prediction: Prediction = spec.prediction
        if spec.beta_schedule == "linear":
            betas = linear_betas(spec.timesteps, spec.beta_start, spec.beta_end)
        elif spec.beta_schedule == "cosine":
            betas = cosine_betas(spec.timesteps)
        else:
            raise ValueError(f"unknown beta_schedule {spec.beta_schedule!r}; expected 'linear' or 'cosine'")
        self.betas = betas  # (T,) float64, CPU
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # abar_t = prod_{s<=t} (1 - beta_s), (T,) float64
        self.sqrt_abar = self.alphas_cumprod.sqrt().float()  # (T,) float32
        self.sqrt_one_minus_abar = (1 - self.alphas_cumprod).sqrt().float()  # (T,) float32

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move the float32 lookup tables to `device` (in place) and return self."""
        self.sqrt_abar = self.sqrt_abar.to(device)
        self.sqrt_one_minus_abar = self.sqrt_one_minus_abar.to(device)
        return self

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 4 of Ho et al. 2020: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        # x0, eps: (B, C, H, W); t: (B,) int64
        return _expand(self.sqrt_abar, t, x0) * x0 + _expand(self.sqrt_one_minus_abar, t, x0) * eps  # (B, C, H, W)

    def target(
        self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction: Prediction | None = None
    ) -> torch.Tensor:
        """What the U-Net is trained to output at x_t: the clean image, the noise, or v.

        v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, §4 "v-parameterization").
        """
        prediction = prediction or self.prediction
        if prediction == "x0":
            return x0  # (B, C, H, W)
        if prediction == "eps":
            return eps  # (B, C, H, W)
        if prediction == "v":
            return _expand(self.sqrt_abar, t, x0) * eps - _expand(self.sqrt_one_minus_abar, t, x0) * x0
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {list(get_args(Prediction))}")

    def to_diffusers_scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for `diffusers.DDPMScheduler` with the same betas and parameterisation."""
        return self.spec.diffusers_scheduler_config()
