"""Checkpoint files: safetensors (de)serialisation, written crash-safely. Nothing here unpickles.

Each checkpoint is two files in the job's checkpoint directory:

- ``step-XXXXXXXX.safetensors``: the served weights (the EMA U-Net), with metadata saying how to
  rebuild the network (``unet_config``) and what produced it (``spec``, ``step``).
- ``step-XXXXXXXX.state.safetensors``: everything else an exact resume needs (raw weights,
  optimizer, EMA, RNG states). Never served; written first, so a weights file always has one.

Both are written with `app.files.atomic_write` (temporary file, fsync, rename, fsync the directory).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from app.files import atomic_write

if TYPE_CHECKING:
    from diffusers import UNet2DModel

WEIGHTS_FORMAT = "ddpm-jobs/1"
STATE_FORMAT = "ddpm-jobs-state/1"
_WEIGHTS_NAME = re.compile(r"^step-(\d{8})\.safetensors$")


class CheckpointError(Exception):
    """A checkpoint file is missing, corrupt or not ours; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Files


def weights_path(checkpoint_dir: Path, step: int) -> Path:
    return checkpoint_dir / f"step-{step:08d}.safetensors"


def state_path_for(weights: Path) -> Path:
    """``step-XXXXXXXX.safetensors`` -> its sibling ``step-XXXXXXXX.state.safetensors``."""
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".state.safetensors")


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, weights path) of every served weights file in the directory, oldest first."""
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _WEIGHTS_NAME.match(p.name))]
    return sorted(found)


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest checkpoints (weights first, then state); return the deleted weights.

    Only for callers that own the directory outright (the local CLI); the service deletes a file
    only after its database row.
    """
    deleted = []
    for _, weights in list_checkpoints(checkpoint_dir)[:-keep] if keep > 0 else []:
        weights.unlink(missing_ok=True)
        state_path_for(weights).unlink(missing_ok=True)
        deleted.append(weights)
    return deleted


# ---------------------------------------------------------------------------------------------
# Served weights


def _canonical(data: bytes) -> bytes:
    """Rewrite a safetensors header with sorted keys: safetensors emits metadata in Rust HashMap
    order, which differs between calls, so equal content would otherwise get different sha256s."""
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > size:  # escaping differs from serde_json's: keep the original bytes
        return data
    return data[:8] + header.ljust(size, b" ") + data[8 + size :]


def _to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def serialize_weights(state_dict: dict[str, torch.Tensor], *, step: int, spec_json: str, unet_config: dict) -> bytes:
    metadata = {
        "format": WEIGHTS_FORMAT,
        "step": str(step),
        "spec": spec_json,
        "unet_config": json.dumps(unet_config, sort_keys=True),
    }
    return _canonical(save_safetensors(_to_cpu(state_dict), metadata=metadata))


def read_metadata(path: Path | str) -> dict[str, str]:
    """The metadata of a safetensors file (all values are strings)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e


def _checked_metadata(path: Path | str, expected_format: str) -> dict[str, str]:
    metadata = read_metadata(path)
    if metadata.get("format") != expected_format:
        raise CheckpointError(f"{path} is not a {expected_format} file (format={metadata.get('format')!r})")
    return metadata


def load_unet(path: Path | str, device: torch.device | str = "cpu") -> UNet2DModel:
    """Rebuild the served U-Net from a weights file, in eval mode, on `device`."""
    from diffusers import UNet2DModel  # here, so reading metadata does not import diffusers

    metadata = _checked_metadata(path, WEIGHTS_FORMAT)
    unet = UNet2DModel.from_config(json.loads(metadata["unet_config"]))
    unet.load_state_dict(load_file(str(path)), strict=True)
    return unet.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Training state (for resume)


@dataclass
class TrainingState:
    """Everything besides the served weights that makes a resumed run bit-identical."""

    step: int
    spec_json: str
    model: dict[str, torch.Tensor]  # raw (non-EMA) state_dict
    optimizer: dict[str, Any]  # torch Optimizer.state_dict()
    ema: dict[str, Any]  # diffusers EMAModel.state_dict() (shadow_params: list of tensors)
    rng: dict[str, torch.Tensor]  # "torch" (CPU global), optionally "cuda", and one per torch.Generator
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # loop accumulators kept on device
    values: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable loop counters


def serialize_state(state: TrainingState) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    tensors.update({f"model.{k}": v for k, v in state.model.items()})

    # Optimizer: tensor state flattened to "optimizer.<param index>.<key>", the rest as JSON.
    scalar_state: dict[str, dict[str, Any]] = {}
    for index, param_state in state.optimizer["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalar_state.setdefault(str(index), {})[key] = value

    ema = dict(state.ema)
    for i, shadow in enumerate(ema.pop("shadow_params")):
        tensors[f"ema.{i}"] = shadow
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    tensors.update({f"loop.{k}": v for k, v in state.tensors.items()})

    metadata = {
        "format": STATE_FORMAT,
        "step": str(state.step),
        "spec": state.spec_json,
        "optimizer_param_groups": json.dumps(state.optimizer["param_groups"]),
        "optimizer_scalar_state": json.dumps(scalar_state),
        "ema": json.dumps(ema),
        "loop": json.dumps(state.values),
    }
    return _canonical(save_safetensors(_to_cpu(tensors), metadata=metadata))


def load_state(path: Path | str) -> TrainingState:
    """Read a ``.state.safetensors`` file (tensors on CPU; the trainer moves them)."""
    if not Path(path).is_file():
        raise CheckpointError(f"training state {path} does not exist; this checkpoint cannot be resumed")
    metadata = _checked_metadata(path, STATE_FORMAT)
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read training state {path}: {e}") from e

    def section(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in section("optimizer.").items():
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(metadata["optimizer_scalar_state"]).items():
        optimizer_state.setdefault(int(index), {}).update(values)
    param_groups = json.loads(metadata["optimizer_param_groups"])
    for group in param_groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])

    shadow = section("ema.")
    ema = json.loads(metadata["ema"]) | {"shadow_params": [shadow[str(i)] for i in range(len(shadow))]}
    return TrainingState(
        step=int(metadata["step"]),
        spec_json=metadata["spec"],
        model=section("model."),
        optimizer={"state": optimizer_state, "param_groups": param_groups},
        ema=ema,
        rng=section("rng."),
        tensors=section("loop."),
        values=json.loads(metadata["loop"]),
    )


# ---------------------------------------------------------------------------------------------
# One checkpoint = state file, then weights file


@dataclass(frozen=True)
class WrittenCheckpoint:
    path: Path
    sha256: str
    size_bytes: int
    state_path: Path


def write_checkpoint(
    checkpoint_dir: Path,
    *,
    served_weights: dict[str, torch.Tensor],
    unet_config: dict,
    state: TrainingState,
) -> WrittenCheckpoint:
    """Write the training state, then the served weights (so every weights file can be resumed)."""
    weights = weights_path(checkpoint_dir, state.step)
    state_file = state_path_for(weights)
    atomic_write(state_file, serialize_state(state))
    data = serialize_weights(served_weights, step=state.step, spec_json=state.spec_json, unet_config=unet_config)
    digest = atomic_write(weights, data)
    return WrittenCheckpoint(path=weights, sha256=digest, size_bytes=len(data), state_path=state_file)
