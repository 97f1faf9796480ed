"""The denoising network: a diffusers `UNet2DModel` configured from a `JobSpec`."""

from __future__ import annotations

from typing import Any

from diffusers import UNet2DModel
from torch import nn

from app.model_shape import attention_levels
from app.spec import JobSpec


def unet_config(spec: JobSpec) -> dict[str, Any]:
    """Keyword arguments for `UNet2DModel` (JSON-serialisable; saved in every checkpoint).

    Level i works at image_size / 2**i pixels; a level whose size is listed in
    `model.attention_resolutions` gets self-attention blocks, and the up path mirrors the down path.
    """
    m, d = spec.model, spec.dataset
    assert m.channels is not None and m.attention_resolutions is not None  # filled from the preset
    levels = attention_levels(spec)  # app/model_shape.py: what decides the parameters, checked at submit
    attention = [i in levels for i in range(len(m.channels))]
    down = ["AttnDownBlock2D" if attn else "DownBlock2D" for attn in attention]
    up = ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention)]
    return {
        "sample_size": d.image_size,
        "in_channels": d.channels,
        "out_channels": d.channels,
        "block_out_channels": list(m.channels),
        "layers_per_block": m.layers_per_block,
        "norm_num_groups": m.norm_groups,
        "dropout": m.dropout,
        "attention_head_dim": None,  # one head as wide as the level (Ho et al. 2020)
        "down_block_types": down,
        "up_block_types": up,
        # Ho et al.'s TF network as ported to diffusers (google/ddpm-cifar10-32): sin-then-cos
        # timestep embedding with shift 1, asymmetric "SAME" padding in the downsamplers, eps 1e-6.
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "downsample_padding": 0,
        "norm_eps": 1e-6,
        "num_train_timesteps": spec.diffusion.timesteps,
    }


def build_unet(spec: JobSpec) -> UNet2DModel:
    """A freshly initialised U-Net (weights drawn from torch's global RNG: seed it first)."""
    return UNet2DModel(**unet_config(spec))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
