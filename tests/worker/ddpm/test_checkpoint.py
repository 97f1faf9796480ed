"""Safetensors checkpoints (crash-safe writes themselves: tests/app/test_files.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load, load_file, save

from app.files import atomic_write, sha256_file
from app.spec import JobSpec
from worker.ddpm import checkpoint
from worker.ddpm.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_state,
    load_unet,
    prune_checkpoints,
    read_metadata,
)
from worker.ddpm.model import build_unet, unet_config
from worker.ddpm.trainer import train


class TestTrainedCheckpoint:
    @pytest.fixture
    def trained(self, tmp_path: Path, tiny_spec: Callable[..., JobSpec], make_sink: Any) -> tuple[JobSpec, Any]:
        spec = tiny_spec(model={"dropout": 0.1}, training={"steps": 3, "checkpoint_every": 3})
        sink = make_sink()
        train(spec, tmp_path, sink, device="cpu")
        return spec, sink

    def test_saved_checkpoint_describes_the_file(self, trained: tuple[JobSpec, Any]) -> None:
        _, sink = trained
        (saved,) = sink.checkpoints
        assert saved.path.name == "step-00000003.safetensors"
        assert saved.state_path.name == "step-00000003.state.safetensors"
        assert saved.sha256 == sha256_file(saved.path)
        assert saved.size_bytes == saved.path.stat().st_size
        assert sorted(p.name for p in saved.path.parent.iterdir()) == [saved.path.name, saved.state_path.name]

    def test_metadata(self, trained: tuple[JobSpec, Any]) -> None:
        spec, sink = trained
        meta = read_metadata(sink.checkpoints[0].path)
        assert meta["format"] == "ddpm-jobs/1" and meta["step"] == "3"
        assert JobSpec.model_validate_json(meta["spec"]) == spec
        assert json.loads(meta["unet_config"]) == unet_config(spec)

    def test_loads_into_diffusers_unet_with_ema_outputs(self, trained: tuple[JobSpec, Any]) -> None:
        spec, sink = trained
        saved = sink.checkpoints[0]
        loaded = load_unet(saved.path)
        assert isinstance(loaded, UNet2DModel) and not loaded.training

        # The EMA model rebuilt independently from the state file's shadow weights.
        state = load_state(saved.state_path)
        ema_model = build_unet(spec).eval()
        names = [n for n, _ in ema_model.named_parameters()]
        ema_model.load_state_dict(dict(zip(names, state.ema["shadow_params"], strict=True)))
        raw_model = build_unet(spec).eval()
        raw_model.load_state_dict(state.model)

        x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 49])
        with torch.no_grad():
            assert torch.equal(loaded(x, t).sample, ema_model(x, t).sample)
            assert not torch.equal(loaded(x, t).sample, raw_model(x, t).sample)  # EMA != raw weights

    def test_served_file_is_plain_state_dict(self, trained: tuple[JobSpec, Any]) -> None:
        spec, sink = trained
        tensors = load_file(sink.checkpoints[0].path)
        assert tensors.keys() == build_unet(spec).state_dict().keys()

    def test_state_file_contents(self, trained: tuple[JobSpec, Any]) -> None:
        spec, sink = trained
        state = load_state(sink.checkpoints[0].state_path)
        assert state.step == 3
        assert state.ema["optimization_step"] == 3 and len(state.ema["shadow_params"]) > 0
        assert set(state.rng) == {"torch", "noise"}
        first = state.optimizer["state"][0]
        assert set(first) == {"step", "exp_avg", "exp_avg_sq"} and first["step"].item() == 3
        assert state.optimizer["param_groups"][0]["lr"] == pytest.approx(spec.training.learning_rate)


class TestDeterministicBytes:
    def test_same_content_same_sha256(self) -> None:
        metadata = {"step": "1", "spec": "{}", "format": "x", "unet_config": "{}"}
        tensors = {"b": torch.ones(3), "a": torch.zeros(2, 2)}
        blobs = {checkpoint._canonical(save(tensors, metadata=metadata)) for _ in range(20)}
        assert len(blobs) == 1
        loaded = load(blobs.pop())
        assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])


class TestErrors:
    def test_not_a_checkpoint(self, tmp_path: Path) -> None:
        bogus = tmp_path / "step-00000001.safetensors"
        bogus.write_bytes(b"not safetensors")
        with pytest.raises(CheckpointError, match=str(bogus)):
            load_unet(bogus)

    def test_wrong_format(self, tmp_path: Path) -> None:
        from safetensors.torch import save_file

        other = tmp_path / "other.safetensors"
        save_file({"w": torch.zeros(1)}, str(other), metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match="not a ddpm-jobs/1 file"):
            load_unet(other)

    def test_missing_state(self, tmp_path: Path) -> None:
        with pytest.raises(CheckpointError, match="cannot be resumed"):
            load_state(tmp_path / "step-00000001.state.safetensors")


class TestPrune:
    def test_keeps_newest(self, tmp_path: Path, tiny_spec: Callable[..., JobSpec]) -> None:
        spec = tiny_spec(training={"steps": 1})
        unet = build_unet(spec)
        for step in (1, 2, 10):
            path = checkpoint.weights_path(tmp_path, step)
            atomic_write(checkpoint.state_path_for(path), b"state")
            atomic_write(
                path, checkpoint.serialize_weights(unet.state_dict(), step=step, spec_json="{}", unet_config={})
            )
        deleted = prune_checkpoints(tmp_path, keep=2)
        assert [p.name for p in deleted] == ["step-00000001.safetensors"]
        assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 10]
        assert not (tmp_path / "step-00000001.state.safetensors").exists()
