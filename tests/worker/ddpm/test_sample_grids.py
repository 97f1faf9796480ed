"""Sample grids drawn during training: when, what, and that they leave training untouched."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from app.files import sha256_file
from worker.ddpm.sampling import sample_images
from worker.ddpm.sink import SavedSample
from worker.ddpm.trainer import train


@dataclass
class SamplingSink:
    points: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    samples: list[SavedSample] = field(default_factory=list)

    def on_log(self, point: Any) -> None:
        self.points.append(point)

    def on_checkpoint(self, saved: Any) -> None:
        self.checkpoints.append(saved)

    def on_sample(self, saved: SavedSample) -> None:
        self.samples.append(saved)


class TestSampleGrids:
    def test_every_sample_every_steps_and_at_the_end(self, tmp_path: Path, tiny_spec) -> None:
        spec = tiny_spec(training={"steps": 7, "sample_every": 3, "sample_count": 4})
        sink = SamplingSink()
        train(spec, tmp_path, sink, device="cpu")
        assert [s.step for s in sink.samples] == [3, 6, 7]
        for saved in sink.samples:
            assert saved.path == tmp_path / "samples" / f"step-{saved.step:08d}.png"
            assert sha256_file(saved.path) == saved.sha256
            assert saved.size_bytes == saved.path.stat().st_size
            with Image.open(saved.path) as grid:
                # 4 images of 8x8 in a 2x2 grid with 1-pixel padding; grayscale for 1 channel.
                assert (grid.size, grid.mode) == ((19, 19), "L")

    def test_zero_turns_them_off(self, tmp_path: Path, tiny_spec) -> None:
        sink = SamplingSink()
        train(tiny_spec(training={"sample_every": 0}), tmp_path / "off", sink, device="cpu")
        assert sink.samples == [] and not (tmp_path / "off" / "samples").exists()

    def test_sampling_leaves_training_bit_identical_and_resumable(self, tmp_path: Path, tiny_spec) -> None:
        quiet = tiny_spec(training={"steps": 6, "sample_every": 0}, model={"dropout": 0.1})
        sampled = tiny_spec(training={"steps": 6, "sample_every": 2}, model={"dropout": 0.1})
        a, b = SamplingSink(), SamplingSink()
        train(quiet, tmp_path / "a", a, device="cpu")
        train(sampled, tmp_path / "b", b, device="cpu")
        assert [p.loss for p in a.points] == [p.loss for p in b.points]
        # Resumed from step 3 (after the grid at 2), the run ends with the same weights.
        c = SamplingSink()
        train(sampled, tmp_path / "c", c, device="cpu", resume_from=b.checkpoints[0].path)
        assert c.checkpoints[-1].sha256 == b.checkpoints[-1].sha256
        assert [s.sha256 for s in c.samples] == [s.sha256 for s in b.samples if s.step > 3]

    def test_ddim_and_ddpm_samplers_are_seeded(self, tiny_spec) -> None:
        from worker.ddpm.model import build_unet

        spec = tiny_spec()
        unet = build_unet(spec)
        for sampler, steps in (("ddpm", None), ("ddim", 5)):
            calls: list[tuple[int, int]] = []
            one = sample_images(unet, spec, 2, seed=5, sampler=sampler, steps=steps)
            two = sample_images(
                unet, spec, 2, seed=5, sampler=sampler, steps=steps, progress=lambda *c, calls=calls: calls.append(c)
            )
            assert one.shape == (2, 1, 8, 8) and torch.equal(one, two)
            assert one.min() >= -1 and one.max() <= 1
            total = 5 if sampler == "ddim" else spec.diffusion.timesteps  # ddpm: the whole chain of T steps
            assert calls == [(done, total) for done in range(1, total + 1)]


class OrderSink(SamplingSink):
    """Records every report as (step, order): 0 metric, 1 checkpoint, 2 sample, like event ids."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []

    def on_log(self, point: Any) -> None:
        self.calls.append((point.step, 0))

    def on_checkpoint(self, saved: Any) -> None:
        self.calls.append((saved.step, 1))

    def on_sample(self, saved: SavedSample) -> None:
        self.calls.append((saved.step, 2))


def test_reports_arrive_in_event_key_order(tmp_path: Path, tiny_spec) -> None:
    """Live watchers read rows in (step, order) order, so the sink must be told in that order even
    though checkpoints are written in the background (a later report would never be streamed)."""
    spec = tiny_spec(training={"steps": 12, "log_every": 2, "checkpoint_every": 3, "sample_every": 3})
    sink = OrderSink()
    train(spec, tmp_path, sink, device="cpu")
    assert sink.calls == sorted(sink.calls)
    assert (3, 1) in sink.calls and (3, 2) in sink.calls and (12, 2) in sink.calls
