"""FD, KID and precision/recall against closed forms and direct computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from ddm.expert.metrics import (
    fd_from_stats,
    feature_stats,
    frechet_distance,
    kid,
    knn_radii,
    mmd2_unbiased,
    precision_recall,
)

METHODS = ("eigh", "sqrtm")


def random_spd(rng: np.random.Generator, d: int, scale: float = 1.0) -> np.ndarray:
    a = rng.standard_normal((d, d)) * scale
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("method", METHODS)
def test_fd_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fd_from_stats(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-9)


def test_fd_one_dimensional_is_squared_wasserstein():
    # 1-D Gaussians: W2^2 = (m1 - m2)^2 + (sd1 - sd2)^2
    got = fd_from_stats(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[0.25]]))
    assert got == pytest.approx(9.0 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_fd_full_covariance_methods_agree_and_rotation_invariant():
    rng = np.random.default_rng(1)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 2.0)
    fd_eigh = fd_from_stats(mu1, s1, mu2, s2, method="eigh")
    fd_sqrtm = fd_from_stats(mu1, s1, mu2, s2, method="sqrtm")
    # a direct textbook evaluation as a third opinion
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fd_eigh == pytest.approx(direct, rel=1e-8)
    assert fd_sqrtm == pytest.approx(direct, rel=1e-8)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # a rotation of feature space changes nothing
    rotated = fd_from_stats(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert rotated == pytest.approx(fd_eigh, rel=1e-8)


def test_fd_commuting_covariances_closed_form():
    # covariances diagonal in one shared rotated basis: Tr sqrt(S1 S2) = sum sqrt(l1 l2)
    rng = np.random.default_rng(2)
    d = 10
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    l1, l2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    mu = rng.standard_normal(d)
    expected = np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    assert fd_from_stats(mu, s1, mu, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fd_of_a_set_with_itself_is_zero(method):
    a = np.random.default_rng(3).standard_normal((500, 32)) * 3 + 1
    assert frechet_distance(a, a, method=method) == pytest.approx(0.0, abs=1e-8)


def test_fd_of_samples_approaches_closed_form():
    rng = np.random.default_rng(4)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, -1.0, 0.5])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([0.5, 2.0, 2.0, 1.5])
    a = mu1 + rng.standard_normal((n, d)) * np.sqrt(s1)
    b = mu2 + rng.standard_normal((n, d)) * np.sqrt(s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_fd_rank_deficient_covariances_are_finite_and_methods_agree():
    # fewer samples than dimensions (as with a few hundred samples in 1280-d): singular covariances
    rng = np.random.default_rng(5)
    a = rng.standard_normal((40, 100))
    b = rng.standard_normal((40, 100)) + 0.3
    fd_eigh = frechet_distance(a, b, method="eigh")
    fd_sqrtm = frechet_distance(a, b, method="sqrtm")
    assert np.isfinite(fd_eigh) and fd_eigh > 0
    assert fd_sqrtm == pytest.approx(fd_eigh, rel=1e-3)


def test_fd_accepts_torch_and_rejects_bad_shapes():
    a = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(np.zeros(10), np.zeros(10))
    with pytest.raises(ValueError, match="shapes do not match"):
        fd_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 2), np.nan), np.zeros((5, 2)))


def test_feature_stats_matches_numpy():
    a = np.random.default_rng(6).standard_normal((30, 5))
    mu, sigma = feature_stats(a)
    np.testing.assert_allclose(mu, a.mean(0))
    np.testing.assert_allclose(sigma, np.cov(a.T))


# ---------------------------------------------------------------------------------------------------
# KID


def mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(u, v):
        return (float(u @ v) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_mmd_unbiased_matches_direct_double_sum():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((5, 3)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(mmd2_by_loops(x, y), rel=1e-12)


def test_kid_single_full_subset_equals_mmd():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 4))
    mean, std = kid(x, y, subsets=3, subset_size=100)  # subset = all rows: every subset is the same
    assert mean == pytest.approx(mmd2_by_loops(x, y), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_shifted_positive():
    rng = np.random.default_rng(9)
    d = 16
    a, b = rng.standard_normal((2000, d)), rng.standard_normal((2000, d))
    shifted = rng.standard_normal((2000, d)) + 0.5
    same_mean, same_std = kid(a, b, subsets=20, subset_size=500)
    shift_mean, _ = kid(a, shifted, subsets=20, subset_size=500)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shift_mean > 0.05 and shift_mean > 10 * abs(same_mean)
    self_mean, _ = kid(a, a, subsets=20, subset_size=500)  # independent subsets of one set
    assert abs(self_mean) < 0.01


def test_kid_is_reproducible_and_seeded():
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((300, 8)), rng.standard_normal((300, 8)) + 0.2
    assert kid(a, b, 10, 100, seed=1) == kid(a, b, 10, 100, seed=1)
    assert kid(a, b, 10, 100, seed=1) != kid(a, b, 10, 100, seed=2)
    with pytest.raises(ValueError, match="subsets"):
        kid(a, b, subsets=0)


# ---------------------------------------------------------------------------------------------------
# precision / recall


def test_precision_recall_identical_sets():
    a = np.random.default_rng(11).standard_normal((300, 20))
    assert precision_recall(a, a.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_disjoint_far_clusters():
    rng = np.random.default_rng(12)
    real = rng.standard_normal((200, 10))
    fake = rng.standard_normal((200, 10)) + 100.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_half_overlap():
    # real = clusters A and B, fake = the same points of A plus a far cluster C:
    # half the fakes lie on the real manifold and half the reals on the fake manifold.
    rng = np.random.default_rng(13)
    a = rng.standard_normal((100, 8))
    b = rng.standard_normal((100, 8)) + 50.0
    c = rng.standard_normal((100, 8)) - 50.0
    precision, recall = precision_recall(np.concatenate([a, b]), np.concatenate([a, c]), k=3)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(0.5)


def test_precision_recall_hand_computed_1d():
    # real 0,1,2,3 with k=1: every radius is 1, so 0.5 is inside and 10 is not -> precision 1/2.
    # fake 0.5, 10 with k=1: both radii are 9.5, so every real point is inside -> recall 1.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_precision_recall_mode_collapse_keeps_precision_loses_recall():
    rng = np.random.default_rng(14)
    real = rng.standard_normal((400, 6))
    collapsed = real[:20][rng.integers(0, 20, 400)] + 1e-3 * rng.standard_normal((400, 6))
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision > 0.95
    assert recall < 0.3


def test_knn_radii_and_chunking():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    torch.testing.assert_close(knn_radii(x, 1), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    torch.testing.assert_close(knn_radii(x, 2), torch.tensor([3.0, 2.0, 3.0, 6.0]))
    rng = np.random.default_rng(15)
    real, fake = rng.standard_normal((150, 5)), rng.standard_normal((120, 5)) * 1.3
    assert precision_recall(real, fake, k=3, chunk=7) == precision_recall(real, fake, k=3, chunk=1000)
    with pytest.raises(ValueError, match="k must be"):
        knn_radii(x, 4)
