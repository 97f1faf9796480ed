"""Bounds that keep one job from exhausting a worker, checked when a job is submitted.

The spec's own validation (app/spec.py) says what is meaningful; these say what this service
accepts (Settings, `DDPM_MAX_*`). A refusal is a 422 whose `loc` names the field, in the shape
FastAPI gives its own validation errors.

The U-Net's size is computed here from the spec without torch: the parameter count of the
diffusers `UNet2DModel` that `worker/ddpm/model.py::unet_config` builds, checked against
`sum(p.numel())` of the real model in tests/app/test_limits.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.jobs.data_roots import DatasetPathRefused, resolve_dataset_folder
from app.spec import JobSpec

FLOAT_BYTES = 4  # training runs in float32
# Bytes per parameter held on the GPU while training: weights, gradients, AdamW's two moments
# and the EMA copy.
BYTES_PER_PARAMETER = 5 * FLOAT_BYTES
# Activations kept for the backward pass, in feature maps of the block's size (C x H x W), per
# image. Rough counts for diffusers' blocks: a ResnetBlock2D keeps about 8 (two GroupNorms,
# two SiLUs, two convolutions, dropout, the residual sum); an attention block about 6 (norm, q,
# k, v, output, residual). Its (H*W)^2 score matrix is not counted: diffusers' attention runs
# through torch's scaled_dot_product_attention, whose fused CUDA kernels never store it.
RESNET_MAPS = 8
ATTENTION_MAPS = 6


@dataclass
class SpecRefused(Exception):
    """One or more fields exceed this service's limits; `errors` are FastAPI-shaped."""

    errors: list[dict[str, Any]] = field(default_factory=list)

    def add(self, loc: tuple[str | int, ...], msg: str, value: Any, limit: Any = None) -> None:
        error: dict[str, Any] = {"type": "limit_exceeded", "loc": ["body", *loc], "msg": msg, "input": value}
        if limit is not None:
            error["ctx"] = {"limit": limit}
        self.errors.append(error)

    def __str__(self) -> str:
        return "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in self.errors)


def check_spec(spec: JobSpec, settings: Settings) -> None:
    """SpecRefused naming every field over a limit; returns None when the spec is accepted."""
    refused = SpecRefused()
    bounds: list[tuple[tuple[str | int, ...], int, int, str]] = [
        (("training", "steps"), spec.training.steps, settings.max_steps, "MAX_STEPS"),
        (("training", "batch_size"), spec.training.batch_size, settings.max_batch_size, "MAX_BATCH_SIZE"),
        (("dataset", "image_size"), spec.dataset.image_size, settings.max_image_size, "MAX_IMAGE_SIZE"),
        (("diffusion", "timesteps"), spec.diffusion.timesteps, settings.max_timesteps, "MAX_TIMESTEPS"),
    ]
    bounds += [
        (("model", "channels", i), c, settings.max_channels, "MAX_CHANNELS")
        for i, c in enumerate(spec.model.channels or ())
    ]
    bounds.append((("resources", "gpus"), spec.resources.gpus, settings.max_gpus_per_job, "MAX_GPUS_PER_JOB"))
    for loc, value, limit, env in bounds:
        if value > limit:
            refused.add(loc, f"at most {limit} on this service (DDPM_{env}), got {value}", value, limit)
    for loc, text in ((("name",), spec.name), (("dataset", "path"), spec.dataset.path)):
        if text is not None and "\0" in text:
            refused.add(loc, "must not contain a NUL character", text)
    if spec.dataset.kind == "folder" and spec.dataset.path is not None and "\0" not in spec.dataset.path:
        try:
            resolve_dataset_folder(spec.dataset.path, settings.data_roots)
        except DatasetPathRefused as exc:
            refused.add(("dataset", "path"), str(exc), spec.dataset.path)
    if refused.errors:
        raise refused

    params = unet_parameter_count(spec)
    if params > settings.max_parameters:
        refused.add(
            ("model", "channels"),
            f"this U-Net has {params:,} parameters; at most {settings.max_parameters:,} on this service "
            "(DDPM_MAX_PARAMETERS): use fewer or narrower levels, or fewer layers_per_block",
            spec.model.channels,
            settings.max_parameters,
        )
        raise refused
    need = training_memory_bytes(spec, params)
    budget = int(settings.gpu_memory_gb * 2**30)
    if need > budget:
        per_image = activation_bytes_per_image(spec)
        gpus = spec.resources.gpus
        fits = max(0, (budget - params * BYTES_PER_PARAMETER) // per_image) * gpus
        refused.add(
            ("training", "batch_size"),
            f"training would need about {need / 2**30:.1f} GiB of memory on each GPU, more than a worker's "
            f"{settings.gpu_memory_gb:g} GiB (DDPM_GPU_MEMORY_GB); at most {fits} images per batch fit "
            f"on {gpus} GPU{'s' if gpus > 1 else ''} with this model and image_size",
            spec.training.batch_size,
            fits,
        )
        raise refused


# --- the U-Net's size, from the spec ----------------------------------------------------------
def _conv3x3(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + c_out


def _linear(c_in: int, c_out: int) -> int:
    return c_in * c_out + c_out


def _resnet(c_in: int, c_out: int, temb: int) -> int:
    """diffusers ResnetBlock2D: norm1, conv1, time_emb_proj, norm2, conv2, 1x1 shortcut if c_in != c_out."""
    params = 2 * c_in + _conv3x3(c_in, c_out) + _linear(temb, c_out) + 2 * c_out + _conv3x3(c_out, c_out)
    return params + (_linear(c_in, c_out) if c_in != c_out else 0)


def _attention(c: int) -> int:
    """diffusers Attention with one head as wide as the level: group_norm, to_q, to_k, to_v, to_out."""
    return 2 * c + 4 * _linear(c, c)


def unet_parameter_count(spec: JobSpec) -> int:
    """Parameters of the `UNet2DModel` built from `unet_config(spec)` (see the module docstring)."""
    m, d = spec.model, spec.dataset
    assert m.channels is not None and m.layers_per_block is not None and m.attention_resolutions is not None
    chans, n = list(m.channels), m.layers_per_block
    levels = len(chans)
    attention = [d.image_size // 2**i in m.attention_resolutions for i in range(levels)]
    temb = 4 * chans[0]

    total = _conv3x3(d.channels, chans[0]) + _linear(chans[0], temb) + _linear(temb, temb)
    prev = chans[0]
    for i, out in enumerate(chans):  # down path: n resnets (+ attention), then a downsampler
        total += sum(_resnet(prev if j == 0 else out, out, temb) for j in range(n))
        total += n * _attention(out) if attention[i] else 0
        total += _conv3x3(out, out) if i < levels - 1 else 0
        prev = out
    total += 2 * _resnet(chans[-1], chans[-1], temb) + _attention(chans[-1])  # mid block
    out = chans[-1]
    for i in range(levels):  # up path: n + 1 resnets fed the skip connections, then an upsampler
        prev_out, out = out, chans[levels - 1 - i]
        skip_in = chans[max(levels - 2 - i, 0)]
        for j in range(n + 1):
            skip = skip_in if j == n else out
            total += _resnet((prev_out if j == 0 else out) + skip, out, temb)
        total += (n + 1) * _attention(out) if attention[levels - 1 - i] else 0
        total += _conv3x3(out, out) if i < levels - 1 else 0
    return total + 2 * chans[0] + _conv3x3(chans[0], d.channels)


def activation_bytes_per_image(spec: JobSpec) -> int:
    """A rough estimate (within a factor of about 2) of the activation memory one training image
    takes on the GPU: the feature maps every block keeps for the backward pass."""
    m, d = spec.model, spec.dataset
    assert m.channels is not None and m.layers_per_block is not None and m.attention_resolutions is not None
    n, floats = m.layers_per_block, 0
    for i, c in enumerate(m.channels):
        size = d.image_size // 2**i
        pixels = size * size
        mid = i == len(m.channels) - 1  # the mid block (2 resnets, 1 attention) works at the last level
        resnets = 2 * n + 1 + (2 if mid else 0)  # down n, up n + 1
        attentions = (2 * n + 1 if size in m.attention_resolutions else 0) + (1 if mid else 0)
        floats += resnets * RESNET_MAPS * c * pixels
        floats += attentions * ATTENTION_MAPS * c * pixels
    return floats * FLOAT_BYTES


def training_memory_bytes(spec: JobSpec, params: int | None = None) -> int:
    """On each GPU: weights, gradients, optimizer state and EMA, plus its share of the batch's activations."""
    params = unet_parameter_count(spec) if params is None else params
    share = spec.training.batch_size // spec.resources.gpus
    return params * BYTES_PER_PARAMETER + share * activation_bytes_per_image(spec)
