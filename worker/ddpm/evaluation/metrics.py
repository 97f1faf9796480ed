"""The Fréchet distance (FID) and the kernel inception distance (KID) of two feature sets, in float64.

FID (Heusel et al. 2017, eq. 6): the Fréchet distance between Gaussians fitted to the features,
||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with scipy's matrix square root, real part, as
EDM and clean-fid compute it. KID (Binkowski et al. 2018, eq. 4 with their cubic kernel): the
unbiased estimate of the squared MMD with k(x, y) = (x.y / d + 1)^3, averaged over random
subsets, as StyleGAN3 and torch-fidelity compute it (their standard deviation over the subsets too).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg


def mean_and_covariance(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(D,) mean and (D, D) unbiased covariance of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (Heusel et al. 2017).

    S1 S2 is similar to a positive semi-definite matrix, so its square root is real up to rounding:
    the real part is kept. Where a (near-)singular product makes sqrtm fail, both covariances get
    1e-6 on the diagonal first (pytorch-fid's remedy)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(len(mu1)) * 1e-6
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root).real)


def kernel_inception_distance(
    feats_gen: np.ndarray, feats_ref: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation over `subsets` random subsets (without replacement, of
    min(subset_size, n_gen, n_ref) rows each) of the unbiased MMD^2 estimate (Binkowski et al. 2018):

        sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1)) - 2 sum_{i, j} k(x_i, y_j) / m^2

    with k(x, y) = (x.y / d + 1)^3, d the feature dimension."""
    x_all, y_all = np.asarray(feats_gen, np.float64), np.asarray(feats_ref, np.float64)
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set; got {len(x_all)} and {len(y_all)}")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets)
    for s in range(subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]  # (m, d)
        y = y_all[rng.choice(len(y_all), m, replace=False)]  # (m, d)
        within = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3  # (m, m): k(x_i, x_j) + k(y_i, y_j)
        between = (x @ y.T / d + 1) ** 3  # (m, m): k(x_i, y_j)
        mmds[s] = (within.sum() - np.trace(within)) / (m * (m - 1)) - 2 * between.sum() / m**2
    return float(mmds.mean()), float(mmds.std())
