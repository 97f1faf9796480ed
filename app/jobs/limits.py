"""Bounds that keep one job from exhausting a worker, checked when a job is submitted.

The spec's own validation (app/spec.py) says what is meaningful; these say what this service
accepts (Settings, `DDPM_MAX_*`). A refusal is a 422 whose `loc` names the field, in the shape
FastAPI gives its own validation errors.

The U-Net's size comes from the spec without torch (app/spec_size.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.jobs.data_roots import DatasetPathRefused, check_dataset_folder
from app.spec import JobSpec
from app.spec_size import BYTES_PER_PARAMETER, activation_bytes_per_image, training_memory_bytes, unet_parameter_count


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
            check_dataset_folder(spec.dataset.path, settings.data_roots, settings.dataset_folder_check)
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
        per_gpu = max(0, (budget - params * BYTES_PER_PARAMETER) // activation_bytes_per_image(spec))
        gpus = spec.resources.gpus
        needs = f"training would need about {need / 2**30:.1f} GiB of memory on each GPU, more than a worker's "
        needs += f"{settings.gpu_memory_gb:g} GiB (DDPM_GPU_MEMORY_GB)"
        if spec.training.micro_batch is not None:  # the micro-batch is what the GPU holds at once
            fit = f"at most {per_gpu} images per micro-batch fit with this model and image_size"
            refused.add(("training", "micro_batch"), f"{needs}; {fit}", spec.training.micro_batch, per_gpu)
            raise refused
        fits = per_gpu * gpus
        fit = (
            f"at most {fits} images per batch fit on {gpus} GPU{'s' if gpus > 1 else ''} with this model and image_size"
        )
        # A batch that does not fit whole can still train in micro-batches that do.
        split = f", or keep the batch and set training.micro_batch to at most {per_gpu}" if per_gpu else ""
        refused.add(("training", "batch_size"), f"{needs}; {fit}{split}", spec.training.batch_size, fits)
        raise refused
