"""Feature networks: TorchScript files, loaded only once their sha256 is the one expected.

The call convention (FID's Inception as StyleGAN2-ADA, EDM and clean-fid ship it, and the digits
classifier alike): ``net(images, return_features=True) -> (N, D) float`` with `images` float32
in [0, 255], shape (N, 3, H, W), any H and W: the network resizes. Grayscale images are repeated
to three channels here. Generated images are quantised to uint8 first, as a saved PNG would be,
so that samples and training images reach the network the same way.

Loading TorchScript runs code from the file, so the sha256 is checked on the bytes before
`torch.jit.load` ever sees them.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.ddpm.data import to_uint8
from worker.ddpm.evaluation.cache import EvaluationSetup

__all__ = [
    "INCEPTION",
    "EvaluationUnavailable",
    "FeatureNetwork",
    "FeatureNetworkError",
    "inception_network",
    "load_feature_network",
    "to_uint8",
]

INCEPTION = "inception-v3"  # EvaluationPoint.feature_network for the Inception features
FEATURE_BATCH = 250  # images per call of a feature network (Inception at 299x299: about 1 GB of activations)


class FeatureNetworkError(Exception):
    """A feature network file is missing, unreadable, or not the file its sha256 names."""


class EvaluationUnavailable(Exception):
    """No feature network can be had for this run; `reason` says why (for the job's log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FeatureNetwork:
    name: str  # what the features are: "inception-v3", "digits-classifier"
    sha256: str  # of the TorchScript file
    module: torch.jit.ScriptModule

    @torch.no_grad()
    def features(self, images: torch.Tensor, device: torch.device | str = "cpu") -> np.ndarray:
        """(N, D) float64 features of uint8 images (N, C, H, W), C = 1 or 3, in batches of FEATURE_BATCH."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            found = f"{images.dtype} {tuple(images.shape)}"
            raise ValueError(f"feature networks take uint8 (N, 1|3, H, W) images, not {found}")
        dev = torch.device(device)
        module = self.module.to(dev).eval()
        rows = []
        for start in range(0, len(images), FEATURE_BATCH):
            batch = images[start : start + FEATURE_BATCH].to(dev).float()  # (B, C, H, W) in [0, 255]
            if batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)  # grayscale repeated to (B, 3, H, W)
            rows.append(module(batch, return_features=True).double().cpu())  # (B, D)
        return torch.cat(rows).numpy()


def load_feature_network(source: bytes | Path, sha256_expected: str, name: str) -> FeatureNetwork:
    """The TorchScript network in `source` (its bytes, or a file), on the CPU, once the sha256 of
    those bytes is `sha256_expected`; FeatureNetworkError naming what did not match otherwise."""
    what = f"feature network {source}" if isinstance(source, Path) else f"feature network {name!r}"
    if not sha256_expected:
        raise FeatureNetworkError(f"{what}: no sha256 to check it against; refusing to load it")
    if isinstance(source, Path):
        try:
            source = source.read_bytes()
        except OSError as e:
            raise FeatureNetworkError(f"{what} cannot be read: {e.strerror or e}") from e
    actual = hashlib.sha256(source).hexdigest()
    if actual != sha256_expected.lower():
        raise FeatureNetworkError(f"{what} has sha256 {actual}, expected {sha256_expected}; refusing to load it")
    try:
        module = torch.jit.load(io.BytesIO(source), map_location="cpu")
    except RuntimeError as e:
        raise FeatureNetworkError(f"{what} is not a TorchScript file: {e}") from e
    return FeatureNetwork(name=name, sha256=actual, module=module)


_inception: dict[tuple[str, str], FeatureNetwork] = {}  # (path, sha256) -> network: each file loaded once per process
_inception_lock = threading.Lock()


def inception_network(setup: EvaluationSetup) -> FeatureNetwork:
    """The Inception-v3 features of `setup.fid_weights` (DDPM_FID_WEIGHTS), checked against
    `setup.fid_weights_sha256`; EvaluationUnavailable saying what is missing or wrong otherwise."""
    path, sha256 = setup.fid_weights, setup.fid_weights_sha256
    if path is None:
        raise EvaluationUnavailable("no Inception weights are configured (DDPM_FID_WEIGHTS)")
    if not sha256:
        raise EvaluationUnavailable(
            f"the Inception weights {path} have no sha256 to be checked against (DDPM_FID_WEIGHTS_SHA256 is unset)"
        )
    if not Path(path).is_file():
        raise EvaluationUnavailable(f"the Inception weights file {path} (DDPM_FID_WEIGHTS) does not exist")
    with _inception_lock:
        key = (str(path), sha256)
        if key not in _inception:
            try:
                _inception[key] = load_feature_network(Path(path), sha256, INCEPTION)
            except FeatureNetworkError as e:
                raise EvaluationUnavailable(str(e)) from e
        return _inception[key]
