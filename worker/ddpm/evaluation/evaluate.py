"""One run's evaluation: FID and KID of samples from the EMA weights against the training images.

Built once per run (rank 0 alone, in a multi-GPU job): it picks the feature network (the digits
classifier for the `digits` set, Inception otherwise, or none: then it says "evaluation
unavailable: <why>" once and every `evaluate` is None), and gets the reference statistics of the
training images from the cache, or computes and caches them. `evaluate` then draws
`evaluation.samples` images with `evaluation.sampler` in `evaluation.steps` steps, always from the
same seeded noise, quantises them as a PNG would be, and compares their features with the
reference: FID on the mean and covariance, KID on feature rows (metrics.py).

Reference statistics are cached under ``reference/<sha256 of the uint8 images>-<network
sha256[:16]>.npz``: the same images and network give the same statistics, whichever job asks.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.training_utils import EMAModel

from app.spec import JobSpec
from worker.ddpm.data import to_uint8
from worker.ddpm.evaluation.cache import EvaluationCache, EvaluationSetup
from worker.ddpm.evaluation.digits import digits_network
from worker.ddpm.evaluation.features import EvaluationUnavailable, FeatureNetwork, inception_network
from worker.ddpm.evaluation.metrics import frechet_distance, kernel_inception_distance, mean_and_covariance
from worker.ddpm.sampling import sample_images
from worker.ddpm.sink import EvaluationPoint
from worker.ddpm.state import derive_seed, ema_state_dict

log = logging.getLogger(__name__)

REFERENCE_MAX_IMAGES = 50_000  # FID's customary reference size; a larger set gives a seeded subset
REFERENCE_KID_ROWS = 5_000  # feature rows kept for KID (its subsets take 1,000)
REFERENCE_SEED = 0  # picks that subset and those rows: fixed, so that the cached statistics are the images'
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0  # StyleGAN3's and torch-fidelity's defaults
SAMPLE_BATCH_PIXELS = 1 << 19  # images drawn per batch x H x W: 512 at 32x32, all of a digits run at 8x8


@dataclass(frozen=True)
class ReferenceStatistics:
    mu: np.ndarray  # (D,) mean of the training images' features
    sigma: np.ndarray  # (D, D) their covariance
    features: np.ndarray  # (<= REFERENCE_KID_ROWS, D) rows, for KID
    images: int  # training images the statistics are of

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.mu, sigma=self.sigma, features=self.features, images=np.int64(self.images))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceStatistics:
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            return cls(saved["mu"], saved["sigma"], saved["features"], int(saved["images"]))


def feature_network(spec: JobSpec, setup: EvaluationSetup) -> FeatureNetwork:
    """The digits classifier for the `digits` set, Inception for any other; EvaluationUnavailable if none."""
    if spec.dataset.kind == "digits":
        return digits_network(setup.cache)
    return inception_network(setup)


def reference_name(images: torch.Tensor, network: FeatureNetwork) -> str:
    """The cache name of the statistics of `images` (N, C, H, W) uint8 under `network`."""
    pixels = np.ascontiguousarray(images.cpu().numpy())  # no copy for a host tensor (a memory-mapped set)
    return f"reference/{hashlib.sha256(pixels.data).hexdigest()}-{network.sha256[:16]}.npz"


def reference_statistics(
    network: FeatureNetwork, images: torch.Tensor, cache: EvaluationCache, device: torch.device
) -> ReferenceStatistics:
    """The statistics of the training images (N, C, H, W) uint8 (up to REFERENCE_MAX_IMAGES of
    them), from the cache, else computed and saved there."""
    name = reference_name(images, network)
    cached = cache.load(name)
    if cached is not None:
        try:
            return ReferenceStatistics.from_bytes(cached)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
            log.warning("the cached reference statistics %s are unreadable (%s); computing them again", name, e)
    rng = np.random.default_rng(REFERENCE_SEED)
    if len(images) > REFERENCE_MAX_IMAGES:
        images = images[torch.from_numpy(np.sort(rng.choice(len(images), REFERENCE_MAX_IMAGES, replace=False)))]
    features = network.features(images, device)  # (N, D)
    mu, sigma = mean_and_covariance(features)
    if len(features) > REFERENCE_KID_ROWS:
        features = features[np.sort(rng.choice(len(features), REFERENCE_KID_ROWS, replace=False))]
    statistics = ReferenceStatistics(mu, sigma, features, len(images))
    cache.save(name, statistics.to_bytes())
    return statistics


def ema_copy(unet: torch.nn.Module, ema: EMAModel) -> torch.nn.Module:
    """A copy of the U-Net with the EMA weights, in eval mode; training's modules and RNG untouched."""
    network = copy.deepcopy(unet).eval()
    network.load_state_dict(ema_state_dict(unet, ema))
    return network


class Evaluator:
    """FID and KID of a run's samples against its training images (see the module docstring)."""

    def __init__(self, spec: JobSpec, setup: EvaluationSetup, images: torch.Tensor, device: torch.device) -> None:
        """`images`: the training images, (N, C, H, W) uint8, as the loop loaded them (host or device)."""
        self.spec, self.dev = spec, torch.device(device)
        self.network: FeatureNetwork | None = None
        self.reference: ReferenceStatistics | None = None
        try:
            self.network = feature_network(spec, setup)
        except EvaluationUnavailable as e:
            log.warning("evaluation unavailable: %s", e.reason)
            return
        self.reference = reference_statistics(self.network, images, setup.cache, self.dev)

    def evaluate(self, step: int, unet: torch.nn.Module, ema: EMAModel) -> EvaluationPoint | None:
        """FID and KID of `evaluation.samples` images drawn from the EMA weights; None when unavailable."""
        if self.network is None or self.reference is None:
            return None
        start = time.perf_counter()
        features = self._sample_features(ema_copy(unet, ema))  # (samples, D)
        mu, sigma = mean_and_covariance(features)
        reference = self.reference
        kid, kid_std = kernel_inception_distance(features, reference.features, KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED)
        return EvaluationPoint(
            step=step,
            fid=frechet_distance(mu, sigma, reference.mu, reference.sigma),
            kid=kid,
            kid_std=kid_std,
            samples=len(features),
            reference_images=reference.images,
            feature_network=self.network.name,
            seconds=time.perf_counter() - start,
        )

    def _sample_features(self, network: torch.nn.Module) -> np.ndarray:
        """Features of `evaluation.samples` images, drawn in batches, batch i from seed
        derive_seed(training.seed, "evaluation") + i: the same noise at every evaluation."""
        assert self.network is not None
        cfg, size = self.spec.evaluation, self.spec.dataset.image_size
        assert cfg.samples is not None  # resolved by JobSpec
        seed, batch = derive_seed(self.spec.training.seed, "evaluation"), max(1, SAMPLE_BATCH_PIXELS // size**2)
        rows = []
        for i, first in enumerate(range(0, cfg.samples, batch)):
            count = min(batch, cfg.samples - first)
            images = sample_images(
                network, self.spec, count, (seed + i) % 2**63, self.dev, sampler=cfg.sampler, steps=cfg.steps
            )  # (B, C, H, W) in [-1, 1]
            rows.append(self.network.features(to_uint8(images), self.dev))  # quantised as a PNG: (B, D)
        return np.concatenate(rows)
