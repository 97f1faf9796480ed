"""Sampling against diffusers' own DDPMPipeline, and the PNG grid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DPMSolverMultistepScheduler
from PIL import Image

from app.files import sha256_file
from app.spec import JobSpec
from worker.ddpm.model import build_unet
from worker.ddpm.sampling import make_scheduler, sample_images, save_grid_png


@pytest.fixture
def spec(tiny_spec: Callable[..., JobSpec]) -> JobSpec:
    return tiny_spec(diffusion={"timesteps": 10, "prediction": "eps"}, dataset={"channels": 3})


class TestSampleImages:
    def test_matches_ddpm_pipeline(self, spec: JobSpec) -> None:
        torch.manual_seed(0)
        unet = build_unet(spec)
        ours = sample_images(unet, spec, count=3, seed=7, device="cpu")
        assert ours.shape == (3, 3, 8, 8) and ours.min() >= -1 and ours.max() <= 1

        pipeline = DDPMPipeline(unet=unet, scheduler=make_scheduler(spec))
        pipeline.set_progress_bar_config(disable=True)
        theirs = pipeline(
            batch_size=3, generator=torch.Generator().manual_seed(7), num_inference_steps=10, output_type="np"
        ).images  # (B, H, W, C) in [0, 1]
        torch.testing.assert_close(ours, torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1, atol=1e-5, rtol=0)

    def test_seeded(self, spec: JobSpec) -> None:
        unet = build_unet(spec)
        a, b = (sample_images(unet, spec, 2, seed=1, device="cpu") for _ in range(2))
        assert torch.equal(a, b)
        assert not torch.equal(a, sample_images(unet, spec, 2, seed=2, device="cpu"))

    @pytest.mark.parametrize("prediction", ["x0", "v"])
    def test_every_prediction_runs(self, tiny_spec: Callable[..., JobSpec], prediction: str) -> None:
        spec = tiny_spec(diffusion={"timesteps": 10, "prediction": prediction})
        images = sample_images(build_unet(spec), spec, 2, seed=0, device="cpu")
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


class TestDpmSolver:
    """`dpm++` is diffusers' DPM-Solver++ 2M on the job's betas, whatever the network predicts."""

    @pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
    def test_matches_a_pipeline_with_the_solver(self, tiny_spec: Callable[..., JobSpec], prediction: str) -> None:
        spec = tiny_spec(diffusion={"timesteps": 20, "prediction": prediction, "beta_schedule": "cosine"})
        torch.manual_seed(0)
        unet = build_unet(spec)
        ours = sample_images(unet, spec, count=2, seed=3, device="cpu", sampler="dpm++", steps=5)

        config = spec.diffusion.diffusers_scheduler_config()
        del config["variance_type"], config["clip_sample"]  # DDPM's; DPM-Solver has neither
        solver = DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2)
        pipeline = DDPMPipeline(unet=unet, scheduler=solver)
        pipeline.set_progress_bar_config(disable=True)
        theirs = pipeline(
            batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=5, output_type="np"
        ).images  # (B, H, W, C) in [0, 1]
        torch.testing.assert_close(ours, torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1, atol=1e-5, rtol=0)

    def test_unknown_sampler_names_the_valid_ones(self, spec: JobSpec) -> None:
        with pytest.raises(ValueError, match="'ddpm', 'ddim', 'dpm\\+\\+'"):
            sample_images(build_unet(spec), spec, 1, seed=0, sampler="euler")  # type: ignore[arg-type]


class TestGrid:
    def test_rgb_grid(self, tmp_path: Path) -> None:
        images = torch.full((5, 3, 8, 8), -1.0)
        images[4] = 1.0
        digest = save_grid_png(images, tmp_path / "grid.png")
        assert digest == sha256_file(tmp_path / "grid.png")
        with Image.open(tmp_path / "grid.png") as grid:
            assert (grid.mode, grid.size) == ("RGB", (3 * 9 + 1, 2 * 9 + 1))  # 3 columns, 2 rows, 1 px gaps
            assert grid.getpixel((1 + 9, 1 + 9)) == (255, 255, 255)  # image 4: row 1, column 1
            assert grid.getpixel((1, 1)) == (0, 0, 0)

    def test_grayscale_grid(self, tmp_path: Path) -> None:
        save_grid_png(torch.zeros(4, 1, 8, 8), tmp_path / "g.png")
        with Image.open(tmp_path / "g.png") as grid:
            assert (grid.mode, grid.size) == ("L", (19, 19))
            assert grid.getpixel((1, 1)) == 128
