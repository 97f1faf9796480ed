"""Evaluation in the loop (worker/ddpm/evaluation/): the cache, the feature network loader, the
digits classifier, reference statistics and a whole `train()` that evaluates."""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch import nn

from app.spec import JobSpec
from worker.ddpm.data import load_images
from worker.ddpm.distributed import Ranks
from worker.ddpm.evaluation import digits
from worker.ddpm.evaluation.cache import EvaluationSetup, FolderCache, MemoryCache
from worker.ddpm.evaluation.evaluate import Evaluator, reference_name, reference_statistics
from worker.ddpm.evaluation.features import (
    INCEPTION,
    EvaluationUnavailable,
    FeatureNetwork,
    FeatureNetworkError,
    inception_network,
    load_feature_network,
)
from worker.ddpm.model import build_unet
from worker.ddpm.sink import EvaluationPoint, MetricPoint, SavedCheckpoint, SavedSample
from worker.ddpm.trainer import _evaluator, train


class PooledPixels(nn.Module):
    """A stand-in for Inception with its call convention: 2x2 average pools of the three channels."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert images.dtype == torch.float32 and images.shape[1] == 3, "float (N, 3, H, W) expected"
        return F.adaptive_avg_pool2d(images / 255.0, 2).flatten(1)  # (N, 12)


@pytest.fixture
def network_file(tmp_path: Path) -> tuple[Path, str]:
    """The stand-in as a TorchScript file, and its sha256."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(PooledPixels()), buffer)
    path = tmp_path / "features.pt"
    path.write_bytes(buffer.getvalue())
    return path, hashlib.sha256(buffer.getvalue()).hexdigest()


class TestCaches:
    @pytest.mark.parametrize("make", [FolderCache, lambda root: MemoryCache()])
    def test_round_trip_and_miss(self, tmp_path: Path, make: Callable[[Path], FolderCache | MemoryCache]) -> None:
        cache = make(tmp_path)
        assert cache.load("reference/a.npz") is None
        cache.save("reference/a.npz", b"one")
        cache.save("reference/a.npz", b"two")
        assert cache.load("reference/a.npz") == b"two"

    @pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/etc/passwd", "", ".", "a\\..\\b"])
    def test_names_stay_inside(self, tmp_path: Path, name: str) -> None:
        for cache in (FolderCache(tmp_path / "cache"), MemoryCache()):
            with pytest.raises(ValueError, match="must be relative"):
                cache.save(name, b"x")
            with pytest.raises(ValueError, match="must be relative"):
                cache.load(name)
        assert not (tmp_path / "escape").exists()

    def test_folder_files_lie_under_the_root(self, tmp_path: Path) -> None:
        FolderCache(tmp_path).save("networks/n.pt", b"net")
        assert (tmp_path / "networks" / "n.pt").read_bytes() == b"net"


class TestLoader:
    def test_a_network_runs_with_the_call_convention(self, network_file: tuple[Path, str]) -> None:
        path, sha256 = network_file
        network = load_feature_network(path, sha256, "stand-in")
        assert (network.name, network.sha256) == ("stand-in", sha256)
        gray = torch.full((3, 1, 8, 8), 255, dtype=torch.uint8)
        features = network.features(gray)  # grayscale goes in as three channels
        assert features.dtype == np.float64 and features.shape == (3, 12)
        np.testing.assert_allclose(features, 1.0)

    def test_a_wrong_sha256_is_refused_before_loading(self, network_file: tuple[Path, str]) -> None:
        path, sha256 = network_file
        with pytest.raises(FeatureNetworkError, match=f"has sha256 {sha256}, expected {'0' * 64}"):
            load_feature_network(path, "0" * 64, "stand-in")
        with pytest.raises(FeatureNetworkError, match="no sha256"):
            load_feature_network(path.read_bytes(), "", "stand-in")

    def test_a_missing_file_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(FeatureNetworkError, match="cannot be read"):
            load_feature_network(tmp_path / "absent.pt", "0" * 64, "stand-in")

    def test_bytes_that_are_not_torchscript_are_refused(self) -> None:
        data = b"not a network"
        with pytest.raises(FeatureNetworkError, match="not a TorchScript file"):
            load_feature_network(data, hashlib.sha256(data).hexdigest(), "stand-in")


class TestInceptionNetwork:
    def test_unavailable_says_why(self, tmp_path: Path, network_file: tuple[Path, str]) -> None:
        path, sha256 = network_file
        cases = {
            "no Inception weights are configured": EvaluationSetup(MemoryCache()),
            "DDPM_FID_WEIGHTS_SHA256 is unset": EvaluationSetup(MemoryCache(), path),
            "does not exist": EvaluationSetup(MemoryCache(), tmp_path / "absent.pt", sha256),
            f"expected {'1' * 64}": EvaluationSetup(MemoryCache(), path, "1" * 64),
        }
        for reason, setup in cases.items():
            with pytest.raises(EvaluationUnavailable, match=reason):
                inception_network(setup)

    def test_configured_weights_load_once(self, network_file: tuple[Path, str]) -> None:
        path, sha256 = network_file
        setup = EvaluationSetup(MemoryCache(), path, sha256)
        first = inception_network(setup)
        assert first.name == INCEPTION and inception_network(setup) is first


class TestDigitsClassifier:
    def test_deterministic_and_accurate_on_held_out_digits(self) -> None:
        model = digits.train_digits_classifier()
        assert digits.script_bytes(model) == digits.script_bytes(digits.train_digits_classifier())
        images, labels = digits.digits_pixels()
        held_out = images[-digits.HELD_OUT :].expand(-1, 3, -1, -1)
        with torch.no_grad():
            accuracy = (model(held_out).argmax(1) == labels[-digits.HELD_OUT :]).float().mean().item()
        assert accuracy > 0.9

    def test_cached_with_its_sha256_and_loaded_through_the_loader(self, tmp_path: Path) -> None:
        cache = FolderCache(tmp_path)
        network = digits.digits_network(cache)
        data = cache.load(digits.NETWORK_NAME)
        assert data is not None and cache.load(digits.NETWORK_NAME + ".sha256") == network.sha256.encode()
        assert hashlib.sha256(data).hexdigest() == network.sha256 and network.name == "digits-classifier"
        sixteen = torch.zeros((2, 3, 16, 16), dtype=torch.uint8)  # any size: resized to 8x8 inside
        assert network.features(sixteen).shape == (2, 64)

    def test_a_damaged_cached_copy_is_replaced(self) -> None:
        cache = MemoryCache()
        good = digits.digits_network(cache)
        cache.save(digits.NETWORK_NAME, b"damaged")
        assert digits.digits_network(cache).sha256 == good.sha256
        assert cache.load(digits.NETWORK_NAME) != b"damaged"

    def test_a_trained_model_scores_better_than_an_untrained_one(
        self, tiny_spec: Callable[..., JobSpec], tmp_path: Path
    ) -> None:
        spec = tiny_spec(
            training={"steps": 30, "batch_size": 32, "learning_rate": 2e-3, "ema_decay": 0.9, "log_every": 30},
            evaluation={"every": 30, "samples": 100, "steps": 10},
        )
        sink, setup = EventSink(), EvaluationSetup(MemoryCache())
        train(spec, tmp_path, sink, device="cpu", evaluation=setup)
        (trained,) = sink.evaluations
        torch.manual_seed(spec.training.seed)
        untrained = build_unet(spec)
        evaluator = Evaluator(spec, setup, load_images(spec.dataset), torch.device("cpu"))
        before = evaluator.evaluate(0, untrained, EMAModel(untrained.parameters()))
        assert before is not None and before.feature_network == trained.feature_network == "digits-classifier"
        assert (trained.step, trained.samples, trained.reference_images) == (30, 100, 1797)
        assert trained.fid < before.fid / 2 and trained.kid < before.kid


@dataclass
class EventSink:
    """Records what the loop reports, in order, as (kind, step)."""

    events: list[tuple[str, int]] = field(default_factory=list)
    evaluations: list[EvaluationPoint] = field(default_factory=list)

    def on_log(self, point: MetricPoint) -> None:
        self.events.append(("log", point.step))

    def on_checkpoint(self, saved: SavedCheckpoint) -> None:
        self.events.append(("checkpoint", saved.step))

    def on_sample(self, saved: SavedSample) -> None:
        self.events.append(("sample", saved.step))

    def on_evaluation(self, point: EvaluationPoint) -> None:
        self.events.append(("evaluation", point.step))
        self.evaluations.append(point)


@dataclass
class RecordingCache(MemoryCache):
    saved: list[str] = field(default_factory=list)

    def save(self, name: str, data: bytes) -> None:
        self.saved.append(name)
        super().save(name, data)


@pytest.fixture
def images_job(tiny_spec: Callable[..., JobSpec], tmp_path: Path) -> Callable[..., tuple[JobSpec, Path]]:
    """`images_job(evaluation={...})` -> a tiny spec on a user's data set of 24 random 8x8 images, and its file."""
    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, size=(24, 1, 8, 8), dtype=np.uint8))

    def make(**override: object) -> tuple[JobSpec, Path]:
        return tiny_spec(dataset={"kind": "dataset", "id": str(uuid.uuid4())}, **override), path

    return make


class TestTrainingEvaluates:
    def test_evaluations_come_after_the_checkpoint_and_grid_of_their_step(
        self, images_job: Callable[..., tuple[JobSpec, Path]], network_file: tuple[Path, str], tmp_path: Path
    ) -> None:
        spec, images = images_job(
            training={"sample_every": 3, "sample_count": 4}, evaluation={"every": 2, "samples": 16, "steps": 5}
        )
        sink, setup = EventSink(), EvaluationSetup(MemoryCache(), *network_file)
        train(spec, tmp_path / "run", sink, device="cpu", images_file=images, evaluation=setup)
        assert sink.events == [
            ("log", 1),
            ("log", 2),
            ("evaluation", 2),
            ("log", 3),
            ("checkpoint", 3),
            ("sample", 3),
            ("log", 4),
            ("evaluation", 4),
            ("log", 5),
            ("log", 6),
            ("checkpoint", 6),
            ("sample", 6),
            ("evaluation", 6),
        ]
        for point in sink.evaluations:
            assert (point.samples, point.reference_images, point.feature_network) == (16, 24, INCEPTION)
            assert np.isfinite([point.fid, point.kid, point.kid_std]).all() and point.fid > 0 and point.seconds > 0

    def test_keep_best_checkpoints_every_evaluation_step(
        self, images_job: Callable[..., tuple[JobSpec, Path]], network_file: tuple[Path, str], tmp_path: Path
    ) -> None:
        spec, images = images_job(
            training={"checkpoint_every": 5, "log_every": 6, "keep_best": True},
            evaluation={"every": 4, "samples": 8, "steps": 2},
        )
        sink = EventSink()
        setup = EvaluationSetup(MemoryCache(), *network_file)
        train(spec, tmp_path / "run", sink, device="cpu", images_file=images, evaluation=setup)
        assert [event for event in sink.events if event[0] != "log"] == [
            ("checkpoint", 4),
            ("evaluation", 4),
            ("checkpoint", 5),
            ("checkpoint", 6),
            ("evaluation", 6),
        ]

    def test_reference_statistics_are_computed_once_and_the_draw_is_seeded(
        self, images_job: Callable[..., tuple[JobSpec, Path]], network_file: tuple[Path, str], tmp_path: Path
    ) -> None:
        spec, images = images_job(
            training={"steps": 2, "log_every": 2}, evaluation={"every": 2, "samples": 8, "steps": 2}
        )
        cache, runs = RecordingCache(), []
        for run in range(2):
            sink = EventSink()
            setup = EvaluationSetup(cache, *network_file)
            train(spec, tmp_path / f"run-{run}", sink, device="cpu", images_file=images, evaluation=setup)
            runs.append(sink.evaluations[0])
        (name,) = cache.saved  # the second run loaded it
        network = load_feature_network(*network_file, INCEPTION)
        assert name == reference_name(torch.from_numpy(np.load(images)), network)
        assert runs[0].fid == runs[1].fid and runs[0].kid == runs[1].kid

    def test_cached_statistics_are_not_recomputed(self, network_file: tuple[Path, str]) -> None:
        images, cache = torch.zeros((5, 1, 8, 8), dtype=torch.uint8), MemoryCache()
        network = load_feature_network(*network_file, INCEPTION)
        first = reference_statistics(network, images, cache, torch.device("cpu"))
        broken = FeatureNetwork(network.name, network.sha256, module=None)  # type: ignore[arg-type]
        again = reference_statistics(broken, images, cache, torch.device("cpu"))  # would fail if it ran
        assert again.images == first.images == 5 and np.array_equal(again.sigma, first.sigma)

    def test_unavailable_is_said_once_and_training_goes_on(
        self, images_job: Callable[..., tuple[JobSpec, Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        spec, images = images_job(evaluation={"every": 2, "samples": 8, "steps": 2})
        sink = EventSink()
        with caplog.at_level(logging.WARNING):
            result = train(spec, tmp_path, sink, device="cpu", images_file=images, evaluation=None)
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluation unavailable")]
        assert said == ["evaluation unavailable: no Inception weights are configured (DDPM_FID_WEIGHTS)"]
        assert result.final_step == 6 and not sink.evaluations

    def test_only_rank_0_evaluates(self, images_job: Callable[..., tuple[JobSpec, Path]]) -> None:
        spec, _ = images_job(evaluation={"every": 2})
        assert _evaluator(spec, None, data=None, ranks=Ranks(rank=1, world_size=2)) is None  # type: ignore[arg-type]
