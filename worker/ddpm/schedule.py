"""The forward (noising) process of DDPM: betas, cumulative alphas, x_t and training targets.

Betas and their products are computed in float64 (tiny betas lose digits in float32 products),
then kept as float32 lookup tables on the training device.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import torch

from app.spec import DiffusionSpec, LossWeighting, Prediction

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


def loss_weight_table(
    alphas_cumprod: torch.Tensor, prediction: Prediction, weighting: LossWeighting, gamma: float
) -> torch.Tensor:
    """The weight on the per-image MSE to the target at each t. (T,) float32, computed in float64.

    "none": 1. "min_snr" (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"): every parameterisation is weighted so that, counted as an error on x0, its weight is
    min(SNR_t, gamma), with SNR_t = abar_t / (1 - abar_t). From x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    (eq. 4 of Ho et al. 2020) and v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), a
    prediction of eps or v implies an x0 prediction,
    x0^ = (x_t - sqrt(1 - abar) eps^) / sqrt(abar)  or  x0^ = sqrt(abar) x_t - sqrt(1 - abar) v^, so

        x0 - x0^ = -(eps - eps^) / sqrt(SNR)   =>  ||eps - eps^||^2 = SNR ||x0 - x0^||^2
        x0 - x0^ = sqrt(1 - abar) (v - v^)     =>  ||v - v^||^2 = (SNR + 1) ||x0 - x0^||^2   (1 - abar = 1 / (SNR + 1))

    and the weights on the target's MSE are min(SNR, gamma) for x0, min(SNR, gamma) / SNR for eps,
    and min(SNR, gamma) / (SNR + 1) for v. The v weight is easy to get wrong: diffusers' training
    examples added 1 to the eps weight, then (#5238) used min(SNR + 1, gamma) / (SNR + 1), until
    issue #5654 (fixed by #6307) moved the + 1 to the denominator alone.
    The eps weight is computed as min(1, gamma / SNR): the same, and 1 rather than 0/0 where abar is 0.
    """
    if weighting == "none":
        return torch.ones(len(alphas_cumprod), dtype=torch.float32)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss_weighting {weighting!r}; expected one of {list(get_args(LossWeighting))}")
    snr = alphas_cumprod / (1 - alphas_cumprod)  # (T,) float64
    if prediction == "x0":
        weights = snr.clamp(max=gamma)
    elif prediction == "eps":
        weights = (gamma / snr).clamp(max=1.0)
    elif prediction == "v":
        weights = snr.clamp(max=gamma) / (snr + 1)
    else:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {list(get_args(Prediction))}")
    return weights.float()  # (T,)


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
        self.loss_weight_table = loss_weight_table(  # (T,) float32
            self.alphas_cumprod, self.prediction, spec.loss_weighting, spec.min_snr_gamma
        )

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move the float32 lookup tables to `device` (in place) and return self."""
        self.sqrt_abar = self.sqrt_abar.to(device)
        self.sqrt_one_minus_abar = self.sqrt_one_minus_abar.to(device)
        self.loss_weight_table = self.loss_weight_table.to(device)
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

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Each image's weight on its MSE to the target (`loss_weight_table`). (B,) float32, on t's device."""
        return self.loss_weight_table[t]  # (B,)

    def to_diffusers_scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments for `diffusers.DDPMScheduler` with the same betas and parameterisation."""
        return self.spec.diffusers_scheduler_config()
