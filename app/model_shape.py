"""What decides the U-Net's parameters (their names and shapes, and how they are read), from the
spec alone: no torch, so the API checks a fine-tune (`training.init_from`) against its source job
at submit, and the worker checks the source checkpoint again before loading it.

Two specs with the same `model_shape` build U-Nets whose state_dicts load into each other
(worker/ddpm/model.py builds the network from the same fields; tests/app/test_model_shape.py
compares with diffusers). What may differ: dataset.image_size (the convolutions do not care)
as long as the same levels have self-attention, dropout, and everything outside `model`.
"""

from __future__ import annotations

from typing import Any

from app.spec import JobSpec

ATTENTION_LEVELS = "self-attention levels"


def attention_levels(spec: JobSpec) -> list[int]:
    """The U-Net levels with self-attention: level i works at image_size / 2**i pixels and has
    attention when that size is in model.attention_resolutions."""
    m, size = spec.model, spec.dataset.image_size
    assert m.channels is not None and m.attention_resolutions is not None  # filled from the preset
    return [i for i in range(len(m.channels)) if size // 2**i in m.attention_resolutions]


def model_shape(spec: JobSpec) -> dict[str, Any]:
    """The fields that decide the parameters, by the name a user knows them by."""
    m = spec.model
    return {
        "dataset.channels": spec.dataset.channels,
        "model.channels": list(m.channels or ()),
        "model.layers_per_block": m.layers_per_block,
        # GroupNorm's parameters do not depend on it, but the weights were trained to its grouping.
        "model.norm_groups": m.norm_groups,
        ATTENTION_LEVELS: attention_levels(spec),
    }


def shape_differences(source: JobSpec, target: JobSpec) -> list[str]:
    """What differs between the source's network and the target's, one phrase per field
    ("model.channels is [32, 64] there, [64, 128] here"); empty when the weights fit."""
    before, after = model_shape(source), model_shape(target)
    differences = []
    for name, there in before.items():
        here = after[name]
        if there == here:
            continue
        if name == ATTENTION_LEVELS:
            differences.append(
                f"self-attention is on levels {there} there (model.attention_resolutions "
                f"{source.model.attention_resolutions} at dataset.image_size {source.dataset.image_size}), "
                f"on levels {here} here ({target.model.attention_resolutions} at {target.dataset.image_size})"
            )
        else:
            differences.append(f"{name} is {there} there, {here} here")
    return differences
