"""Weights travel as safetensors only (ARCHITECTURE.md invariant 4): a pickle placed where a
checkpoint is expected is refused, and its payload never runs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from worker.ddpm.checkpoint import CheckpointError, load_state, load_unet, state_path_for, weights_path


class Payload:
    """Unpickling this opens (creates) the marker file: code execution, had anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "pwned"


def plant(path: Path, marker: Path, how: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "pickle":
        path.write_bytes(pickle.dumps({"conv_in.weight": Payload(marker)}))
    else:  # torch.save's zip-of-pickles, the format torch.load reads
        torch.save({"conv_in.weight": Payload(marker)}, path)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickle_at_a_checkpoint_path_is_refused_not_executed(tmp_path: Path, marker: Path, how: str) -> None:
    weights = weights_path(tmp_path / "job", 100)
    plant(weights, marker, how)
    plant(state_path_for(weights), marker, how)
    with pytest.raises(CheckpointError, match=str(weights.name)):
        load_unet(weights)
    with pytest.raises(CheckpointError):
        load_state(state_path_for(weights))
    assert not marker.exists()


def test_the_payload_is_live_so_the_test_above_proves_something(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))  # what a pickle-based loader would do
    assert control.exists()


def test_torch_load_refuses_it_too_with_this_torch(tmp_path: Path, marker: Path) -> None:
    """torch>=2.10 (pyproject): torch.load defaults to weights_only=True, which refuses globals."""
    path = tmp_path / "model.pt"
    plant(path, marker, "torch.save")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    assert not marker.exists()
