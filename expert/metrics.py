"""Sample-quality metrics on feature arrays (N, D): Fréchet distance, KID, precision and recall.

Pure functions of features, so they work in any feature space (see ``ddm.expert.features``) and are
tested against closed forms. Everything is computed in float64 except the k-NN distance matrices of
precision/recall, which are float32 chunks (10k x 10k distances do not fit comfortably otherwise).

References:
* FD: Heusel et al. 2017 (FID), d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)); the reference
  implementations (pytorch-fid, clean-fid) take scipy's sqrtm, retry with eps added to the diagonals
  when it is not finite, and drop an imaginary residue if it is small.
* KID: Binkowski et al. 2018, unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random
  subsets (as torch-fidelity / clean-fid do).
* Precision/recall: Kynkäänniemi et al. 2019, each set's manifold is the union of balls reaching to
  every point's k-th nearest neighbour in its own set.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "fd_from_stats",
    "feature_stats",
    "frechet_distance",
    "kid",
    "knn_radii",
    "manifold_coverage",
    "mmd2_unbiased",
    "polynomial_kernel",
    "precision_recall",
]

FDMethod = Literal["eigh", "sqrtm"]


def _as_features(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """float64 numpy (N, D); a ValueError naming the argument otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D feature array (N, D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf features; check the encoder's input range")
    return x


def _same_dim(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names}: feature dimensions differ ({a.shape[1]} vs {b.shape[1]}); use the same extractor for both"
        )


# ---------------------------------------------------------------------------------------------------
# Fréchet distance


def feature_stats(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64; the covariance is unbiased (N - 1), as numpy's."""
    x = _as_features(feats, "feats")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for symmetric PSD S1, S2 via symmetric eigendecompositions.

    S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is symmetric PSD: its eigenvalues are real and
    >= 0, so the trace of the square root is the sum of their square roots. Rank-deficient covariances
    (fewer samples than dimensions) are fine: tiny negative round-off eigenvalues are clipped to 0.
    """
    w, v = np.linalg.eigh(sigma1)  # (D,), (D, D)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^(1/2), (D, D)
    m = root1 @ sigma2 @ root1  # (D, D) symmetric PSD
    m = (m + m.T) / 2
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """Tr((S1 S2)^(1/2)) exactly as pytorch-fid computes it (scipy sqrtm, eps retry, real part)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps  # near-singular product: regularise both covariances
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(
                f"sqrtm of the covariance product has an imaginary component {m:.3g}; use method='eigh'"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def fd_from_stats(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    method: FDMethod = "eigh",
    eps: float = 1e-6,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``method="eigh"`` (default) is exact for PSD covariances and needs no complex-residue handling;
    ``"sqrtm"`` reproduces the reference implementations (they agree to ~1e-8 relative on real data).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}; "
            "expected (D,), (D, D), (D,), (D, D) from the same feature extractor"
        )
    diff = mu1 - mu2  # (D,)
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"unknown FD method {method!r}; choose 'eigh' or 'sqrtm'")
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # a true distance; only round-off can make it negative


def frechet_distance(
    feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor, *, method: FDMethod = "eigh"
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) and (M, D)."""
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _same_dim(a, b, "frechet_distance")
    mu_a, s_a = feature_stats(a)
    mu_b, s_b = feature_stats(b)
    return fd_from_stats(mu_a, s_a, mu_b, s_b, method=method)


# ---------------------------------------------------------------------------------------------------
# KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for every pair: (n, d), (m, d) -> (n, m)."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of samples x (m, d) and y (n, d) under the cubic polynomial kernel.

    mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j).
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    k_xx = polynomial_kernel(x, x)  # (m, m)
    k_yy = polynomial_kernel(y, y)  # (n, n)
    k_xy = polynomial_kernel(x, y)  # (m, n)
    xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


def kid(
    feats_a: np.ndarray | torch.Tensor,
    feats_b: np.ndarray | torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    *,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance in this feature space: (mean, std) of the unbiased MMD^2 over subsets.

    Each subset draws ``min(subset_size, N_a, N_b)`` rows from each set without replacement (numpy
    Generator seeded with ``seed``, so the result is reproducible). The estimate is unbiased, so it can
    be slightly negative for two samples of one distribution.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _same_dim(a, b, "kid")
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets must be an integer >= 1, got {subsets!r}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(
            f"KID needs at least 2 samples in each set (got {a.shape[0]} and {b.shape[0]}, subset_size {subset_size})"
        )
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        ia = rng.choice(a.shape[0], m, replace=False)
        ib = rng.choice(b.shape[0], m, replace=False)
        values[s] = mmd2_unbiased(a[ia], b[ib])
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------------
# precision / recall


def _pairwise_chunks(x: torch.Tensor, y: torch.Tensor, chunk: int):
    """Yield (start, distances (c, M)) for row chunks of x against all of y."""
    for start in range(0, x.shape[0], chunk):
        yield start, torch.cdist(x[start : start + chunk], y)  # (c, M)


def knn_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from every row to its k-th nearest *other* row: (N,) (the point itself is at distance 0)."""
    n = feats.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    radii = torch.empty(n, dtype=feats.dtype)
    for start, d in _pairwise_chunks(feats, feats, chunk):
        rows = torch.arange(d.shape[0])
        d[rows, start + rows] = 0.0  # self-distance is exactly 0 (cdist's matmul path leaves round-off)
        radii[start : start + d.shape[0]] = d.kthvalue(k + 1, dim=1).values  # k+1: skip the point itself
    return radii


def manifold_coverage(
    query: torch.Tensor, ref: torch.Tensor, ref_radii: torch.Tensor, chunk: int = 1024
) -> float:
    """Fraction of ``query`` rows inside at least one ball (ref_j, ref_radii_j)."""
    inside = torch.zeros(query.shape[0], dtype=torch.bool)
    for start, d in _pairwise_chunks(query, ref, chunk):
        inside[start : start + d.shape[0]] = (d <= ref_radii[None, :]).any(dim=1)
    return float(inside.float().mean())


def precision_recall(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3, *, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): (precision, recall) in [0, 1].

    precision = fraction of fake samples inside the real manifold (fidelity);
    recall    = fraction of real samples inside the fake manifold (coverage / diversity).
    Use sets of equal size: the manifolds' radii shrink as a set grows.
    """
    r, f = _as_features(real, "real"), _as_features(fake, "fake")
    _same_dim(r, f, "precision_recall")
    r_t = torch.from_numpy(r).to(torch.float32)  # (N, D)
    f_t = torch.from_numpy(f).to(torch.float32)  # (M, D)
    with torch.no_grad():
        real_radii = knn_radii(r_t, k, chunk)  # (N,)
        fake_radii = knn_radii(f_t, k, chunk)  # (M,)
        precision = manifold_coverage(f_t, r_t, real_radii, chunk)
        recall = manifold_coverage(r_t, f_t, fake_radii, chunk)
    return precision, recall
