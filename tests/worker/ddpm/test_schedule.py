"""NoiseSchedule against an independent reference: diffusers' DDPMScheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from app.spec import DiffusionSpec
from worker.ddpm.schedule import NoiseSchedule


def _reference(spec: DiffusionSpec) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=spec.timesteps,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[spec.beta_schedule],
        beta_start=spec.beta_start,
        beta_end=spec.beta_end,
    )


def _batch(timesteps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(16, 3, 8, 8, generator=g)
    t = torch.cat([torch.tensor([0, timesteps - 1]), torch.randint(0, timesteps, (14,), generator=g)])
    return x0, eps, t


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
@pytest.mark.parametrize("timesteps", [10, 1000])
class TestAgainstDiffusers:
    def test_alphas_cumprod(self, beta_schedule: str, timesteps: int) -> None:
        spec = DiffusionSpec(timesteps=timesteps, beta_schedule=beta_schedule)
        ours = NoiseSchedule(spec).alphas_cumprod
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours.float(), _reference(spec).alphas_cumprod, rtol=1e-5, atol=1e-6)

    def test_add_noise(self, beta_schedule: str, timesteps: int) -> None:
        spec = DiffusionSpec(timesteps=timesteps, beta_schedule=beta_schedule)
        x0, eps, t = _batch(timesteps)
        ours = NoiseSchedule(spec).add_noise(x0, eps, t)
        assert ours.shape == x0.shape and ours.dtype == torch.float32
        torch.testing.assert_close(ours, _reference(spec).add_noise(x0, eps, t), rtol=0, atol=1e-5)

    def test_v_target(self, beta_schedule: str, timesteps: int) -> None:
        spec = DiffusionSpec(timesteps=timesteps, beta_schedule=beta_schedule, prediction="v")
        x0, eps, t = _batch(timesteps)
        ours = NoiseSchedule(spec).target(x0, eps, t)
        torch.testing.assert_close(ours, _reference(spec).get_velocity(x0, eps, t), rtol=0, atol=1e-5)


class TestSchedule:
    def test_linear_endpoints(self) -> None:
        betas = NoiseSchedule(DiffusionSpec(timesteps=1000, beta_start=1e-4, beta_end=0.02)).betas
        assert betas.dtype == torch.float64
        assert (betas[0].item(), betas[-1].item()) == pytest.approx((1e-4, 0.02))

    def test_cosine_betas_are_clipped(self) -> None:
        betas = NoiseSchedule(DiffusionSpec(timesteps=1000, beta_schedule="cosine")).betas
        assert betas.max().item() == pytest.approx(0.999)
        assert (betas > 0).all()

    def test_targets(self) -> None:
        x0, eps, t = _batch(10)
        schedule = NoiseSchedule(DiffusionSpec(timesteps=10))
        assert torch.equal(schedule.target(x0, eps, t), x0)  # spec default is x0
        assert torch.equal(schedule.target(x0, eps, t, "eps"), eps)
        with pytest.raises(ValueError, match=r"\['x0', 'eps', 'v'\]"):
            schedule.target(x0, eps, t, "score")  # type: ignore[arg-type]

    def test_to_moves_tables(self) -> None:
        schedule = NoiseSchedule(DiffusionSpec(timesteps=10)).to("cpu")
        assert schedule.sqrt_abar.device.type == "cpu" and schedule.sqrt_abar.dtype == torch.float32


def _implied_x0(prediction: str, output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The x0 prediction that a network output of the given kind stands for (inverting eq. 4 of Ho et al. 2020)."""
    if prediction == "eps":
        return (x_t - (1 - abar).sqrt() * output) / abar.sqrt()
    if prediction == "v":
        return abar.sqrt() * x_t - (1 - abar).sqrt() * output
    return output


class TestLossWeights:
    @pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
    @pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
    @pytest.mark.parametrize("gamma", [5.0, 1.0])
    def test_min_snr_weights_every_target_as_min_snr_gamma_on_x0(
        self, beta_schedule: str, prediction: str, gamma: float
    ) -> None:
        """Hang et al. 2023: weight x MSE to the target == min(SNR, gamma) x MSE of the implied x0."""
        spec = DiffusionSpec(
            timesteps=1000,
            beta_schedule=beta_schedule,
            prediction=prediction,
            loss_weighting="min_snr",
            min_snr_gamma=gamma,
        )
        schedule = NoiseSchedule(spec)
        x0, eps, t = (v.double() if v.is_floating_point() else v for v in _batch(1000))  # t: 0, T-1, 14 random
        output = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        abar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)  # float64
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        target = {"x0": x0, "eps": eps, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[prediction]
        snr = (abar / (1 - abar)).flatten()
        assert (snr > gamma).any() and (snr < gamma).any()  # both sides of the clamp

        weights = schedule.loss_weights(t)
        assert weights.shape == (16,) and weights.dtype == torch.float32
        weighted = weights.double() * (output - target).square().mean(dim=(1, 2, 3))
        on_x0 = snr.clamp(max=gamma) * (_implied_x0(prediction, output, x_t, abar) - x0).square().mean(dim=(1, 2, 3))
        torch.testing.assert_close(weighted, on_x0, rtol=1e-6, atol=0)

    @pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
    def test_none_is_ones(self, prediction: str) -> None:
        schedule = NoiseSchedule(DiffusionSpec(timesteps=10, prediction=prediction)).to("cpu")
        assert schedule.spec.loss_weighting == "none"
        assert torch.equal(schedule.loss_weights(torch.arange(10)), torch.ones(10))


class TestDiffusersConfig:
    @pytest.mark.parametrize(("ours", "theirs"), [("x0", "sample"), ("eps", "epsilon"), ("v", "v_prediction")])
    def test_prediction_mapping(self, ours: str, theirs: str) -> None:
        config = NoiseSchedule(DiffusionSpec(prediction=ours)).to_diffusers_scheduler_config()
        assert config["prediction_type"] == theirs

    def test_whole_config_builds_same_betas(self) -> None:
        spec = DiffusionSpec(timesteps=50, beta_schedule="cosine", prediction="eps")
        schedule = NoiseSchedule(spec)
        config = schedule.to_diffusers_scheduler_config()
        assert config == {
            "num_train_timesteps": 50,
            "beta_schedule": "squaredcos_cap_v2",
            "beta_start": 1e-4,
            "beta_end": 0.02,
            "prediction_type": "epsilon",
            "variance_type": "fixed_small",
            "clip_sample": True,
        }
        torch.testing.assert_close(DDPMScheduler(**config).betas, schedule.betas.float())
