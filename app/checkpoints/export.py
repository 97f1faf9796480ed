"""A checkpoint as a diffusers pipeline folder (zipped), without torch: the served safetensors
file already holds a UNet2DModel state dict, and its metadata the model config."""

from __future__ import annotations

import json
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from app.spec import JobSpec

# The oldest diffusers release this project supports (pyproject's floor); from_pretrained reads it.
DIFFUSERS_VERSION = "0.31.0"


class NotACheckpoint(ValueError):
    pass


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: an 8-byte little-endian header length, then JSON."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise NotACheckpoint(f"{path.name} is not a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 * 1024 * 1024:
            raise NotACheckpoint(f"{path.name} has an implausible safetensors header")
        header = json.loads(f.read(length))
    return header.get("__metadata__", {})


def diffusers_pipeline_zip(weights: Path, spec: JobSpec) -> Path:
    """A temporary zip of a `DDPMPipeline.from_pretrained` folder; the caller deletes it."""
    metadata = read_safetensors_metadata(weights)
    if "unet_config" not in metadata:
        raise NotACheckpoint(f"{weights.name} carries no unet_config")
    unet_config: dict[str, Any] = {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        **json.loads(metadata["unet_config"]),
    }
    scheduler_config = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        **spec.diffusion.diffusers_scheduler_config(),
    }
    model_index = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    # Stored, not deflated: weights barely compress and the zip is streamed right away.
    with (
        tempfile.NamedTemporaryFile(prefix="ddpm-export-", suffix=".zip", delete=False) as out,
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive,
    ):
        archive.writestr("model_index.json", json.dumps(model_index, indent=2))
        archive.writestr("unet/config.json", json.dumps(unet_config, indent=2))
        archive.write(weights, "unet/diffusion_pytorch_model.safetensors")
        archive.writestr("scheduler/scheduler_config.json", json.dumps(scheduler_config, indent=2))
    return Path(out.name)
