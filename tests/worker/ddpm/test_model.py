"""U-Net construction from a JobSpec."""

from __future__ import annotations

from app.spec import JobSpec
from worker.ddpm.model import build_unet, count_parameters, unet_config


def _spec(**sections: object) -> JobSpec:
    return JobSpec.model_validate(sections)


class TestParameterCounts:
    def test_ddpm_cifar10_matches_ho_et_al(self) -> None:
        spec = _spec(model={"preset": "ddpm-cifar10"}, dataset={"image_size": 32, "channels": 3})
        assert count_parameters(build_unet(spec)) == 35_746_307

    def test_tiny_is_small(self) -> None:
        assert count_parameters(build_unet(_spec())) < 1_000_000


class TestUnetConfig:
    def test_ddpm_cifar10_attention_at_16x16(self) -> None:
        config = unet_config(_spec(model={"preset": "ddpm-cifar10"}, dataset={"image_size": 32, "channels": 3}))
        assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
        assert config["up_block_types"] == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]

    def test_custom_attention_placement(self) -> None:
        spec = _spec(
            model={"preset": "custom", "channels": [8, 16, 16], "attention_resolutions": [16, 4], "norm_groups": 4},
            dataset={"image_size": 16},
        )
        config = unet_config(spec)
        assert config["down_block_types"] == ["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
        assert config["up_block_types"] == ["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"]

    def test_tiny_fields(self) -> None:
        config = unet_config(_spec(dataset={"image_size": 8}))
        assert {k: config[k] for k in ("sample_size", "in_channels", "out_channels", "block_out_channels")} == {
            "sample_size": 8,
            "in_channels": 1,
            "out_channels": 1,
            "block_out_channels": [32, 64],
        }
        assert config["layers_per_block"] == 1 and config["norm_num_groups"] == 8 and config["dropout"] == 0.0
        assert config["attention_head_dim"] is None and config["num_train_timesteps"] == 1000
        assert config["down_block_types"] == ["DownBlock2D", "DownBlock2D"]

    def test_forward_shape(self) -> None:
        import torch

        spec = _spec(dataset={"image_size": 8, "channels": 3})
        out = build_unet(spec)(torch.zeros(2, 3, 8, 8), torch.tensor([0, 999])).sample
        assert out.shape == (2, 3, 8, 8)
