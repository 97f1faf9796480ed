"""How big a job's U-Net is, from its spec alone (no torch): its parameter count, the activation
memory one training image takes, and the memory each GPU needs to train it.

The parameter count is that of the diffusers `UNet2DModel` that `worker/ddpm/model.py::unet_config`
builds, checked against `sum(p.numel())` of the real model in tests/app/test_limits.py. The
service's limits (app/jobs/limits.py) and the queue a job goes to (app/routing.py) both use it.
"""

from __future__ import annotations

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


# A training set (uint8) up to this size is kept on the GPU, where a batch is an index gather; a
# larger one stays in host memory and each batch is copied over ahead of its step
# (worker/ddpm/data.py). The worker also keeps it on the host when it would take more than
# DEVICE_DATASET_SHARE of the GPU's memory, so the estimate below never counts too little.
DEVICE_DATASET_MAX_BYTES = 8 * 2**30
DEVICE_DATASET_SHARE = 0.25


def dataset_bytes(spec: JobSpec) -> int | None:
    """The training set's size as uint8 at the job's image size and channels; None when the
    image count is not known before training (a `folder` data set)."""
    d = spec.dataset
    if d.image_count is None:
        return None
    return d.image_count * d.channels * d.image_size * d.image_size


def dataset_on_device(spec: JobSpec, device_memory_bytes: int | None = None) -> bool:
    """Whether the training set goes on the GPU (see DEVICE_DATASET_MAX_BYTES); a set of unknown
    size is read before this is decided, so the worker asks again with the real count."""
    size = dataset_bytes(spec) or 0
    if device_memory_bytes is not None and size > DEVICE_DATASET_SHARE * device_memory_bytes:
        return False
    return size <= DEVICE_DATASET_MAX_BYTES


def images_in_flight(spec: JobSpec) -> int:
    """The images whose activations a GPU holds at once: one micro-batch when training.micro_batch
    is set (its backward pass frees them before the next one's forward), else its whole share."""
    share = spec.training.batch_size // spec.resources.gpus
    return min(spec.training.micro_batch or share, share)


def training_memory_bytes(spec: JobSpec, params: int | None = None) -> int:
    """On each GPU: weights, gradients, optimizer state and EMA, the activations of the images it
    holds at once (`images_in_flight`), and the training set when it is kept there (each rank
    holds a whole copy)."""
    params = unet_parameter_count(spec) if params is None else params
    data = (dataset_bytes(spec) or 0) if dataset_on_device(spec) else 0
    return params * BYTES_PER_PARAMETER + images_in_flight(spec) * activation_bytes_per_image(spec) + data
