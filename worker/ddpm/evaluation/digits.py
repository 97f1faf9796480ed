"""The feature network of the `digits` set: a small classifier on scikit-learn's 8x8 digits.

Inception's features mean little for 8x8 grayscale digits, so the demo job measures its samples
with the features of a network that knows digits (the same idea as FID's, Heusel et al. 2017:
the penultimate layer of a classifier of the domain). It is trained once, on the CPU, from a fixed
seed and in one thread (so the same on every machine with this torch), saved as TorchScript into
the evaluation cache with its sha256 beside it, and always loaded back through
`load_feature_network`, as the Inception file is. It follows the feature networks' call
convention: (N, 3, H, W) in [0, 255], any size; channels averaged, area-resized to 8x8.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import threading
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from worker.ddpm.evaluation.cache import EvaluationCache
from worker.ddpm.evaluation.features import FeatureNetwork, FeatureNetworkError, load_feature_network

log = logging.getLogger(__name__)

DIGITS_CLASSIFIER = "digits-classifier"  # EvaluationPoint.feature_network
NETWORK_NAME = "networks/digits-classifier-v1.pt"  # in the evaluation cache; its sha256 in NETWORK_NAME + ".sha256"
HELD_OUT = 297  # the last images of scikit-learn's order (other writers) are not trained on: accuracy is measured there
SEED, EPOCHS, BATCH, LEARNING_RATE = 0, 20, 50, 3e-3  # 0.5 s on one core; 93% on the held-out digits


class DigitsClassifier(nn.Module):
    """64 pixels -> 128 -> 64 features -> 10 classes. SiLU rather than ReLU: no feature is
    exactly 0 for most images, so the features' covariance stays full rank for FID."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 128)
        self.penultimate = nn.Linear(128, 64)
        self.classes = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = images.float().mean(dim=1, keepdim=True)  # (N, 1, H, W) in [0, 255]
        x = F.adaptive_avg_pool2d(x, 8)  # area resize to (N, 1, 8, 8); the identity at 8x8
        x = x.flatten(1) / 127.5 - 1.0  # (N, 64) in [-1, 1]
        features = F.silu(self.penultimate(F.silu(self.hidden(x))))  # (N, 64)
        return features if return_features else self.classes(features)  # (N, 64) or (N, 10) logits


def digits_pixels() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as the `digits` data set has them at 8x8 (0..16 scaled to
    0..255, rounded: worker/ddpm/data.py), (N, 1, 8, 8) uint8, and their labels (N,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8)
    return torch.from_numpy(pixels)[:, None], torch.from_numpy(digits.target).long()


def train_digits_classifier() -> DigitsClassifier:
    """The classifier trained on all but the last HELD_OUT digits: Adam, EPOCHS epochs of
    shuffled batches, from SEED. Training's global RNG is left as it was."""
    images, labels = digits_pixels()
    images, labels = images[:-HELD_OUT], labels[:-HELD_OUT]
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(SEED)
        model = DigitsClassifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        for _ in range(EPOCHS):
            for batch in torch.randperm(len(images)).split(BATCH):
                loss = F.cross_entropy(model(images[batch].expand(-1, 3, -1, -1)), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


def script_bytes(model: nn.Module) -> bytes:
    """`model` as a TorchScript file's bytes."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return buffer.getvalue()


_trained: bytes | None = None  # this process's classifier file, trained at most once
_lock = threading.Lock()


def digits_network(cache: EvaluationCache) -> FeatureNetwork:
    """The classifier from the cache; trained (once per process) and saved there when it is missing
    or does not match the sha256 saved beside it."""
    global _trained
    with _lock:
        data, sha256 = cache.load(NETWORK_NAME), cache.load(NETWORK_NAME + ".sha256")
        if data is not None and sha256 is not None:
            try:
                return load_feature_network(data, sha256.decode("ascii", "replace").strip(), DIGITS_CLASSIFIER)
            except FeatureNetworkError as e:
                log.warning("the cached digits classifier is unusable (%s); training it again", e)
        if _trained is None:
            _trained = script_bytes(train_digits_classifier())
        digest = hashlib.sha256(_trained).hexdigest()
        cache.save(NETWORK_NAME, _trained)
        cache.save(NETWORK_NAME + ".sha256", digest.encode())
        return load_feature_network(_trained, digest, DIGITS_CLASSIFIER)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the same float sums, whatever the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
