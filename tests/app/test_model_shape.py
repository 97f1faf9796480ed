"""app/model_shape.py against diffusers: two specs have the same model_shape exactly when their
U-Nets' parameters have the same names and shapes (norm_groups aside: same shapes, other weights)."""

from __future__ import annotations

import itertools

import pytest

from app.model_shape import attention_levels, model_shape, shape_differences
from app.spec import JobSpec

VARIANTS = {
    "base": {},
    "bigger image": {"dataset": {"image_size": 16}},
    "dropout": {"model": {"dropout": 0.2}},
    "rgb": {"dataset": {"channels": 3}},
    "wider": {"model": {"channels": [32, 96]}},
    "deeper": {"model": {"channels": [32, 64, 64]}},
    "two blocks": {"model": {"layers_per_block": 2}},
    "attention at 4": {"model": {"attention_resolutions": [4]}},
    "attention at 8": {"model": {"attention_resolutions": [8]}},
    "attention at 8 of 16": {"model": {"attention_resolutions": [8]}, "dataset": {"image_size": 16}},
}


def parameter_shapes(spec: JobSpec) -> dict[str, tuple[int, ...]]:
    from worker.ddpm.model import build_unet

    return {name: tuple(t.shape) for name, t in build_unet(spec).state_dict().items()}


def test_the_same_shape_means_the_same_parameters() -> None:
    specs = {name: JobSpec.model_validate(body) for name, body in VARIANTS.items()}
    shapes = {name: parameter_shapes(spec) for name, spec in specs.items()}
    for a, b in itertools.combinations(specs, 2):
        same = model_shape(specs[a]) == model_shape(specs[b])
        assert same == (shapes[a] == shapes[b]), (a, b)
        assert (shape_differences(specs[a], specs[b]) == []) == same
    # The pairs that fit each other, so the comparison above is not vacuous.
    assert model_shape(specs["base"]) == model_shape(specs["bigger image"]) == model_shape(specs["dropout"])
    assert model_shape(specs["attention at 8"]) != model_shape(specs["attention at 8 of 16"])
    assert model_shape(specs["attention at 4"]) == model_shape(specs["attention at 8 of 16"])


def test_norm_groups_differ_without_changing_shapes() -> None:
    a, b = JobSpec(), JobSpec.model_validate({"model": {"norm_groups": 16}})
    assert parameter_shapes(a) == parameter_shapes(b)
    assert shape_differences(a, b) == ["model.norm_groups is 8 there, 16 here"]


@pytest.mark.parametrize(("size", "resolutions", "levels"), [(32, [16], [1]), (32, [32, 4], [0, 3]), (8, [], [])])
def test_attention_levels(size: int, resolutions: list[int], levels: list[int]) -> None:
    spec = JobSpec.model_validate(
        {"dataset": {"image_size": size}, "model": {"channels": [8, 8, 8, 8], "attention_resolutions": resolutions}}
    )
    assert attention_levels(spec) == levels
