"""FID and KID (worker/ddpm/evaluation/metrics.py) against independent computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from worker.ddpm.evaluation.metrics import frechet_distance, kernel_inception_distance, mean_and_covariance


def random_covariance(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)  # symmetric positive definite


class TestFrechetDistance:
    def test_identical_statistics_are_at_distance_zero(self) -> None:
        rng = np.random.default_rng(0)
        mu, sigma = rng.normal(size=6), random_covariance(rng, 6)
        assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)

    def test_diagonal_covariances_have_a_closed_form(self) -> None:
        """Tr(sqrt(S1 S2)) = sum sqrt(a_i b_i) for S1 = diag(a), S2 = diag(b)."""
        a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
        mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
        expected = 1 + 0 + 4 + (a + b - 2 * np.sqrt(a * b)).sum()
        assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)

    def test_matches_the_eigenvalues_of_the_product(self) -> None:
        """S1 S2 is similar to S1^(1/2) S2 S1^(1/2) (PSD): Tr sqrtm(S1 S2) = sum of sqrt of its eigenvalues."""
        rng = np.random.default_rng(1)
        mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
        sigma1, sigma2 = random_covariance(rng, 5), random_covariance(rng, 5)
        root_trace = np.sqrt(np.clip(np.linalg.eigvals(sigma1 @ sigma2).real, 0, None)).sum()
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * root_trace
        assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)

    def test_fewer_samples_than_dimensions_stay_finite(self) -> None:
        rng = np.random.default_rng(2)
        mu1, sigma1 = mean_and_covariance(rng.normal(size=(4, 8)))  # rank 3
        mu2, sigma2 = mean_and_covariance(rng.normal(size=(4, 8)))
        assert np.isfinite(frechet_distance(mu1, sigma1, mu2, sigma2))

    def test_mismatched_statistics_are_refused(self) -> None:
        with pytest.raises(ValueError, match="mismatched"):
            frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def explicit_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al. 2018's unbiased MMD^2 with the cubic kernel, pair by pair."""
    m, d = len(x), x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (float(a @ b) / d + 1) ** 3

    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / (m * (m - 1))
    return within - 2 * sum(k(x[i], y[j]) for i, j in itertools.product(range(m), repeat=2)) / m**2


class TestKernelInceptionDistance:
    def test_whole_sets_match_the_pairwise_sum(self) -> None:
        """A subset as large as both sets is each whole set (in some order): exact, the same every subset."""
        rng = np.random.default_rng(3)
        x, y = rng.normal(size=(7, 3)), rng.normal(1.0, 1.0, size=(7, 3))
        mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=100, seed=0)
        assert mean == pytest.approx(explicit_mmd(x, y), rel=1e-12)
        assert std == pytest.approx(0.0, abs=1e-12)

    def test_subsets_average_the_pairwise_sums_of_their_draws(self) -> None:
        rng = np.random.default_rng(4)
        x, y = rng.normal(size=(9, 2)), rng.normal(size=(12, 2))
        mean, std = kernel_inception_distance(x, y, subsets=4, subset_size=5, seed=7)
        draws = np.random.default_rng(7)
        mmds = []
        for _ in range(4):
            xs = x[draws.choice(9, 5, replace=False)]
            mmds.append(explicit_mmd(xs, y[draws.choice(12, 5, replace=False)]))
        assert (mean, std) == pytest.approx((np.mean(mmds), np.std(mmds)), rel=1e-12)

    def test_one_distribution_is_near_zero_and_a_shift_is_not(self) -> None:
        rng = np.random.default_rng(5)
        x, y = rng.normal(size=(400, 4)), rng.normal(size=(400, 4))
        same, _ = kernel_inception_distance(x, y, subsets=10, subset_size=200)
        shifted, _ = kernel_inception_distance(x, y + 1.0, subsets=10, subset_size=200)
        assert abs(same) < 0.05 < shifted
