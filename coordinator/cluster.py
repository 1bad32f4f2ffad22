"""Partitions for the experts: hierarchical spherical k-means (faiss) with optional balanced sizes.

The recipe follows the DDM paper: L2-normalised encoder features, *fine* spherical k-means (hundreds
of centroids) fitted on a sample, the fine centroids grouped into ``k`` *coarse* clusters by k-means
on the fine centroids weighted by their sizes, and every point sent to the coarse cluster of its
nearest fine centroid. The saved :class:`Clustering` (fine centroids + fine->coarse map) is all that
is needed to assign new data the same way later (``ddm assign``).

Balanced partitions (``ClusterConfig.balanced``) keep every cluster within ``N/k * (1 ± tolerance)``
so expert budgets stay even. Nearest-centroid assignment is not balanced, so we solve the
capacity-constrained problem exactly instead of patching it greedily, in two levels:

1. **Grouping** (fit only): constrained k-means on the fine centroids (Bradley, Bennett & Demiriz,
   "Constrained K-Means Clustering", MSR-TR-2000-65): the assignment step is a transportation
   linear programme (fine cells with their sizes as supplies, coarse clusters with capacity
   ``[lower, upper]`` as sinks, solved by HiGHS' dual simplex), the update step the weighted mean.
   The coarse centroids move to where a balanced partition is cheap, instead of keeping the
   unbalanced centroids and pushing points across their borders.
2. **Points** (:meth:`Clustering.assign` with ``balanced=True``): the same transportation problem on
   the batch's fine cells with costs summed over each cell's points. A basic optimal solution splits
   at most 2k cells (it has ``F + 2k`` basic variables, slacks included); every other cell moves
   whole, so the partition stays "coarse cluster of the nearest fine centroid" for almost all
   points and the saved map reproduces it. Only the points of split cells are placed one by one,
   by :func:`balanced_assign`, an exact point-level solver.

:func:`balanced_assign` is dual coordinate ascent on the transportation problem's K prices: each
step sets one cluster's price so that its count is at the nearest bound (the exact maximiser of the
concave dual along that coordinate, at the midpoint between two points' thresholds). When no
cluster can improve, every count is within its bounds and complementary slackness holds, so the
assignment is optimal (the tests check it against HiGHS). Ties between duplicate points are broken
by a fixed 1e-9 perturbation of the costs; should the sweep cap stop the ascent, a greedy repair by
reduced cost still enforces the bounds. Each step is
O(N k); the number of steps grows with k (tens for k=4, thousands for k=16 on heavily skewed data),
which is why the pipeline only hands it the few points of split cells.

faiss k-means is deterministic for a fixed seed and gives identical centroids with 1 and 2 OpenMP
threads (a test pins this; faiss sums each centroid over the points in order, and its BLAS product
gives the same distances here), so no thread pinning is needed. Seeding is greedy k-means++ on a
sample (as scikit-learn's), which matches scikit-learn's k-means++ inertia where faiss' default
random seeding lost 1-3% on our benchmark mixture.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from pydantic import model_validator
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from scipy import sparse
from scipy.optimize import linprog

from ddm.coordinator.config import ClusterSettings
from ddm.core import storage

__all__ = [
    "ClusterConfig",
    "Clustering",
    "balanced_assign",
    "cluster_report",
    "fit_clustering",
    "normalize_features",
    "size_bounds",
    "spherical_kmeans",
]

FORMAT_VERSION = 1
TENSORS_FILE = "clustering.safetensors"
META_FILE = "clustering.json"
_CHUNK = 8192  # rows per block when computing point-to-centroid similarities
_SEED_POINTS_PER_CENTROID = 16  # k-means++ seeding sample: enough to match full-data seeding quality
_COARSE_RESTARTS = 8  # coarse k-means runs on a few hundred points: restarts are nearly free
_GROUPING_RESTARTS = 6  # balanced grouping: k-means++ starts besides the unbalanced solution


class ClusterConfig(ClusterSettings):
    """One clustering fit: ``k`` coarse clusters (one per expert) built from ``fine_k`` fine centroids
    fitted on ``sample_size`` points (the settings are :class:`ddm.coordinator.config.ClusterSettings`,
    defined once with the run config's ``[partition]``)."""

    @model_validator(mode="after")
    def _sample_covers_fine_k(self) -> ClusterConfig:
        if self.sample_size < self.fine_k:
            raise ValueError(
                f"sample_size ({self.sample_size}) must be >= fine_k ({self.fine_k}): each fine centroid needs points to fit"
            )
        return self


# ---------------------------------------------------------------------------------------------------
# inputs


def normalize_features(feats: Any, name: str = "feats") -> np.ndarray:
    """A validated, L2-normalised float32 copy (N, D) of 2-D float features."""
    if not isinstance(feats, np.ndarray):
        raise ValueError(f"{name} must be a numpy array (N, D), got {type(feats).__name__}")
    if feats.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {feats.shape}")
    if not np.issubdtype(feats.dtype, np.floating):
        raise ValueError(
            f"{name} must be a float array, got dtype {feats.dtype}; convert with .astype(np.float32)"
        )
    if feats.shape[0] < 1 or feats.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        bad = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
        raise ValueError(f"{name} has non-finite values (first in row {bad}); fix or drop those rows")
    x = np.array(feats, dtype=np.float32, order="C")  # (N, D), a copy
    norms = np.linalg.norm(x.astype(np.float64), axis=1)  # (N,)
    if (norms == 0).any():
        bad = int(np.flatnonzero(norms == 0)[0])
        raise ValueError(
            f"{name} row {bad} is all zeros: it has no direction to cluster by cosine; drop such rows"
        )
    x /= norms[:, None].astype(np.float32)
    return x


# ---------------------------------------------------------------------------------------------------
# spherical k-means


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    niter: int,
    seed: int,
    *,
    weights: np.ndarray | None = None,
    restarts: int = 1,
) -> np.ndarray:
    """Spherical k-means centroids (k, D) float32, unit norm, of the L2-normalised rows of ``x``.

    Seeding: greedy k-means++ (Arthur & Vassilvitskii 2007, with scikit-learn's 2 + ln k local
    trials) on a sample of ``16 k`` points; then ``niter`` Lloyd iterations of ``faiss.Kmeans``
    (spherical) on all of ``x``. ``weights`` (N,) weight points in both. With ``restarts`` > 1 the
    run with the lowest weighted objective wins (seeds ``seed``, ``seed + 1``, ...).
    """
    xn = normalize_features(x, "x")
    n, d = xn.shape
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, N={n}], got {k!r}")
    if niter < 1:
        raise ValueError(f"niter must be >= 1, got {niter}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    w = _check_weights(weights, n)
    best, best_obj = None, math.inf
    for r in range(restarts):
        rng = np.random.default_rng(seed + r)
        init = _kmeanspp_seed(xn, w, int(k), rng)  # (k, D)
        km = faiss.Kmeans(
            d, int(k), niter=int(niter), seed=int(seed + r), spherical=True,
            max_points_per_centroid=1 << 30, min_points_per_centroid=1, verbose=False,
        )  # fmt: skip
        km.train(xn, weights=w, init_centroids=init)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)  # (k, D)
        if restarts == 1:
            return centroids
        obj = _weighted_objective(xn, centroids, w)
        if obj < best_obj:
            best, best_obj = centroids, obj
    assert best is not None
    return best


def _check_weights(weights: np.ndarray | None, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float32)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise ValueError(f"weights must be ({n},) finite, non-negative and not all zero")
    return w


def _kmeanspp_seed(x: np.ndarray, w: np.ndarray | None, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ on unit vectors (squared distance 2 - 2 cos), on a sample of ~16 k points.

    The k steps are sequential small matrix products, so the sample is kept small: 16 points per
    centroid seeds as well as the full data on our benchmark mixture (bench/cluster.py).
    """
    n = len(x)
    m = min(n, max(k, _SEED_POINTS_PER_CENTROID * k))
    idx = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
    xs, ws = x[idx], (np.ones(m) if w is None else w[idx].astype(np.float64))  # (m, D), (m,)
    if (ws > 0).sum() < k:  # the sample missed weighted points: seed from all of them
        xs, ws = x, (np.ones(n) if w is None else w.astype(np.float64))
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    trials = 2 + int(math.log(k))
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    first = _draw(ws, 1, rng)[0]
    centers[0] = xs[first]
    dist = np.maximum(2.0 - 2.0 * (xs @ xs[first]).astype(np.float64), 0.0)  # (m,) to the nearest center
    for c in range(1, k):
        mass = ws * dist
        # fewer distinct (weighted) points than centroids: draw among the positive-weight points
        cand = _draw(mass if mass.sum() > 0 else ws, trials, rng)  # (trials,)
        d_cand = np.maximum(2.0 - 2.0 * (xs[cand] @ xs.T).astype(np.float64), 0.0)  # (trials, m)
        new_dist = np.minimum(dist[None, :], d_cand)  # (trials, m)
        best = int(np.argmin(new_dist @ ws))
        centers[c], dist = xs[cand[best]], new_dist[best]
    return centers


def _draw(mass: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices drawn with probability proportional to ``mass`` (>= 0, not all zero)."""
    cum = np.cumsum(mass)
    return np.minimum(np.searchsorted(cum, rng.random(size) * cum[-1], side="right"), len(mass) - 1)


def _weighted_objective(x: np.ndarray, centroids: np.ndarray, w: np.ndarray | None) -> float:
    sims = (x @ centroids.T).max(axis=1).astype(np.float64)  # (N,) cosine to the nearest centroid
    return float(((1.0 - sims) * (1.0 if w is None else w)).sum())


# ---------------------------------------------------------------------------------------------------
# balanced assignment


def size_bounds(n: int, k: int, tolerance: float) -> tuple[int, int]:
    """Integer cluster-size bounds ``[lower, upper]`` for ``n`` points in ``k`` clusters.

    ``ceil(n/k (1 - tol))`` and ``floor(n/k (1 + tol))``, widened to ``floor(n/k)`` / ``ceil(n/k)``
    when the tolerance is tighter than integers allow, so the bounds are always feasible.
    """
    if k < 1 or n < 0:
        raise ValueError(f"size_bounds needs k >= 1 and n >= 0, got n={n}, k={k}")
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance must lie in [0, 1], got {tolerance}")
    lower = min(math.ceil(n / k * (1 - tolerance) - 1e-9), n // k)
    upper = max(math.floor(n / k * (1 + tolerance) + 1e-9), -(-n // k))
    return int(lower), int(upper)


def balanced_assign(
    cost: np.ndarray,
    *,
    lower: int | np.ndarray,
    upper: int | np.ndarray,
    max_sweeps: int = 2000,
) -> np.ndarray:
    """Labels (N,) int64 minimising ``sum_i cost[i, label_i]`` with ``lower <= count_k <= upper``.

    An exact solver of this transportation problem by dual coordinate ascent on the k cluster
    prices (see the module docstring); ``lower``/``upper`` are ints or per-cluster arrays (k,).
    With costs = distances, the unconstrained optimum is nearest-centroid assignment and the
    prices are the smallest penalties/subsidies that bring every cluster within its bounds.
    """
    c = np.asarray(cost)
    if c.ndim != 2 or c.shape[1] < 1:
        raise ValueError(f"cost must be 2-D (N, k), got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.floating) and not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"cost must be numeric, got dtype {c.dtype}")
    if not np.isfinite(c).all():
        raise ValueError("cost has non-finite entries; use a large finite cost to discourage a cluster")
    n, k = c.shape
    lo = _bounds_array(lower, k, "lower")
    hi = _bounds_array(upper, k, "upper")
    if (lo > hi).any():
        raise ValueError(
            f"lower must not exceed upper for any cluster, got lower={lo.tolist()} upper={hi.tolist()}"
        )
    if lo.sum() > n or hi.sum() < n:
        raise ValueError(
            f"no assignment of N={n} points fits: "
            f"sum(lower)={int(lo.sum())} must be <= N <= sum(upper)={int(hi.sum())}"
        )
    if k == 1 or n == 0:
        return np.zeros(n, dtype=np.int64)
    # A tiny fixed perturbation makes every threshold distinct (duplicate points would otherwise tie
    # and stall the ascent); it changes the total cost by less than N * 1e-9 * scale.
    scale = float(np.abs(c).max()) + 1.0
    c = c.astype(np.float64) + np.random.default_rng(0).random((n, k)) * (1e-9 * scale)  # (N, k)
    prices = np.zeros(k)
    labels = np.argmin(c, axis=1)  # (N,)
    counts = np.bincount(labels, minlength=k)
    rows = np.arange(n)
    for _ in range(max_sweeps):
        progressed = False
        for j in range(k):
            if not _violates(j, counts, prices, lo, hi):
                continue
            adjusted = c + prices  # (N, k)
            adjusted[:, j] = np.inf
            alt = np.argmin(adjusted, axis=1)  # (N,) best other cluster
            margin = adjusted[rows, alt] - c[:, j]  # (N,) point i picks j iff prices[j] < margin[i]
            new_price = _coordinate_price(margin, lo[j], hi[j])
            if new_price == prices[j]:
                continue  # a tie at the threshold (duplicate points): leave it to the repair
            prices[j] = new_price
            labels = np.where(margin > new_price, j, alt)
            counts = np.bincount(labels, minlength=k)
            progressed = True
        if not progressed:
            break
    if ((counts < lo) | (counts > hi)).any():
        labels = _repair(c + prices, labels, lo, hi)
    return labels.astype(np.int64)


def _bounds_array(value: int | np.ndarray, k: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value), (k,)) if np.ndim(value) == 0 else np.asarray(value)
    if arr.shape != (k,) or not np.issubdtype(arr.dtype, np.integer) or (arr < 0).any():
        raise ValueError(
            f"{name} must be a non-negative integer or an integer array of shape ({k},), got {value!r}"
        )
    return arr.astype(np.int64)


def _violates(j: int, counts: np.ndarray, prices: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Cluster j is out of bounds, or its price breaks complementary slackness (penalised but not
    full, subsidised but above its minimum): either way its coordinate of the dual can improve."""
    n_j = counts[j]
    return bool(
        n_j > hi[j] or n_j < lo[j] or (prices[j] > 0 and n_j < hi[j]) or (prices[j] < 0 and n_j > lo[j])
    )


def _coordinate_price(margin: np.ndarray, lo: int, hi: int) -> float:
    """The price maximising the dual along one cluster's coordinate: 0 if the unpriced count is
    within bounds, else the midpoint between the thresholds around the nearest bound."""
    n = len(margin)
    free = int((margin > 0).sum())
    if lo <= free <= hi:
        return 0.0
    target = hi if free > hi else lo
    desc = -np.sort(-margin)  # thresholds, largest first: the t best-suited points take the cluster
    if target == 0:
        return float(desc[0] + 1e-9 * (1.0 + abs(desc[0])))
    if target == n:
        return float(desc[-1] - 1e-9 * (1.0 + abs(desc[-1])))
    return float(0.5 * (desc[target - 1] + desc[target]))


def _repair(reduced: np.ndarray, labels: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Bring every count within bounds by the cheapest moves in reduced cost: the safety net for
    when the sweep cap stops the ascent early (it keeps the bounds, not necessarily the optimum)."""
    labels = labels.copy()
    n, k = reduced.shape
    counts = np.bincount(labels, minlength=k)
    for _ in range(n + 1):
        over = np.flatnonzero(counts > hi)
        under = np.flatnonzero(counts < lo)
        if not len(over) and not len(under):
            return labels
        if len(over):  # push the cheapest points out of the fullest cluster into clusters with room
            a = int(over[np.argmax(counts[over] - hi[over])])
            open_ = counts < hi
            open_[a] = False
            members = np.flatnonzero(labels == a)
            delta = np.where(open_[None, :], reduced[members], np.inf) - reduced[members, a][:, None]
            dest = np.argmin(delta, axis=1)
            order = np.argsort(delta[np.arange(len(members)), dest], kind="stable")
            excess = counts[a] - hi[a]
            for i in order:
                if excess == 0:
                    break
                b = dest[i]
                if counts[b] < hi[b]:
                    labels[members[i]] = b
                    counts[a] -= 1
                    counts[b] += 1
                    excess -= 1
        else:  # pull the cheapest points into the emptiest cluster from clusters above their minimum
            b = int(under[np.argmax(lo[under] - counts[under])])
            spare = counts > lo
            spare[b] = False
            cand = np.flatnonzero(spare[labels])
            delta = reduced[cand, b] - reduced[cand, labels[cand]]
            order = np.argsort(delta, kind="stable")
            deficit = lo[b] - counts[b]
            for i in order:
                if deficit == 0:
                    break
                a = labels[cand[i]]
                if counts[a] > lo[a]:
                    labels[cand[i]] = b
                    counts[a] -= 1
                    counts[b] += 1
                    deficit -= 1
    raise AssertionError("repair did not converge; bounds were checked feasible")


def _transport(unit_cost: np.ndarray, weights: np.ndarray, lower: int, upper: int) -> np.ndarray:
    """Optimal (F, k) flow of ``weights[f]`` units from each cell to clusters of size in
    ``[lower, upper]``, cost ``unit_cost[f, c]`` per unit; a basic (vertex) solution, so integral."""
    f, k = unit_cost.shape
    nvar = f * k
    cols = np.arange(nvar)
    a_eq = sparse.csr_matrix((np.ones(nvar), (np.repeat(np.arange(f), k), cols)), shape=(f, nvar))
    per_cluster = sparse.csr_matrix((np.ones(nvar), (np.tile(np.arange(k), f), cols)), shape=(k, nvar))
    a_ub = sparse.vstack([per_cluster, -per_cluster]).tocsr()
    b_ub = np.concatenate([np.full(k, upper, dtype=np.float64), np.full(k, -lower, dtype=np.float64)])
    res = linprog(
        unit_cost.ravel().astype(np.float64), A_ub=a_ub, b_ub=b_ub, A_eq=a_eq, b_eq=weights.astype(np.float64),
        bounds=(0, None), method="highs-ds",
    )  # fmt: skip
    if res.status != 0:
        raise RuntimeError(
            f"balanced transport LP failed ({res.message}); bounds [{lower}, {upper}] for {weights.sum()} points"
        )
    return res.x.reshape(f, k)  # (F, k)


# ---------------------------------------------------------------------------------------------------
# the fitted clustering


@dataclass(eq=False)
class Clustering:
    """Everything needed to assign data to clusters: fine centroids and their coarse cluster."""

    fine_centroids: np.ndarray  # (F, D) float32, unit norm
    fine_to_coarse: np.ndarray  # (F,) int64 in [0, k)
    coarse_centroids: np.ndarray  # (k, D) float32, unit norm
    fine_sizes: np.ndarray  # (F,) int64: points of the fitting data nearest each fine centroid
    config: ClusterConfig

    def __post_init__(self) -> None:
        f, d = self.fine_centroids.shape
        k = self.config.k
        if self.fine_centroids.dtype != np.float32 or f != self.config.fine_k:
            raise ValueError(
                f"fine_centroids must be float32 ({self.config.fine_k}, D), "
                f"got {self.fine_centroids.dtype} {self.fine_centroids.shape}"
            )
        if self.fine_to_coarse.shape != (f,) or self.fine_to_coarse.dtype != np.int64:
            raise ValueError(
                f"fine_to_coarse must be int64 ({f},), got {self.fine_to_coarse.dtype} {self.fine_to_coarse.shape}"
            )
        if f and (self.fine_to_coarse.min() < 0 or self.fine_to_coarse.max() >= k):
            raise ValueError(f"fine_to_coarse values must lie in [0, {k})")
        if self.coarse_centroids.shape != (k, d):
            raise ValueError(f"coarse_centroids must be ({k}, {d}), got {self.coarse_centroids.shape}")
        if self.fine_sizes.shape != (f,):
            raise ValueError(f"fine_sizes must be ({f},), got {self.fine_sizes.shape}")

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def dim(self) -> int:
        return int(self.fine_centroids.shape[1])

    def assign(
        self, feats: np.ndarray, *, balanced: bool = False, tolerance: float | None = None
    ) -> np.ndarray:
        """Coarse labels (N,) int64 for features (N, D).

        Unbalanced: the coarse cluster of each point's nearest fine centroid. Balanced: the batch is
        partitioned with every cluster within ``N/k (1 ± tolerance)`` (default: the config's) at
        least total distance; whole fine cells move, and only the few cells the optimum splits
        are placed point by point (see the module docstring).
        """
        x = normalize_features(feats)
        if x.shape[1] != self.dim:
            raise ValueError(
                f"feats have {x.shape[1]} dimensions but the clustering was fitted on {self.dim}"
            )
        cells, cost = self._cells_and_costs(x)
        if not balanced or self.k == 1:
            return self.fine_to_coarse[cells]
        tol = self.config.tolerance if tolerance is None else float(tolerance)
        lower, upper = size_bounds(len(x), self.k, tol)
        return _balanced_by_cells(cells, cost, len(self.fine_centroids), lower, upper)

    def _cells_and_costs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest fine centroid (N,) and cost (N, k) = 1 - cosine to the nearest fine centroid of
        each coarse cluster (half the squared distance; for a cluster that owns no fine centroid, to
        its coarse centroid), so the unconstrained argmin is exactly the fine->coarse rule."""
        n, k = len(x), self.k
        groups = [np.flatnonzero(self.fine_to_coarse == c) for c in range(k)]
        cells = np.empty(n, dtype=np.int64)
        cost = np.empty((n, k), dtype=np.float64)
        for s in range(0, n, _CHUNK):
            xb = x[s : s + _CHUNK]
            sims = xb @ self.fine_centroids.T  # (B, F)
            cells[s : s + _CHUNK] = np.argmax(sims, axis=1)
            for c, members in enumerate(groups):
                best = sims[:, members].max(axis=1) if len(members) else xb @ self.coarse_centroids[c]  # (B,)
                cost[s : s + _CHUNK, c] = 1.0 - best.astype(np.float64)
        return cells, np.maximum(cost, 0.0)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, url: str) -> None:
        """Write ``url/clustering.safetensors`` (arrays) then ``url/clustering.json`` (config and the
        arrays' sha256), each atomically; the JSON is written last, so it marks a complete save."""
        payload = st_save(
            {
                "fine_centroids": np.ascontiguousarray(self.fine_centroids),
                "fine_to_coarse": np.ascontiguousarray(self.fine_to_coarse),
                "coarse_centroids": np.ascontiguousarray(self.coarse_centroids),
                "fine_sizes": np.ascontiguousarray(self.fine_sizes),
            }
        )
        storage.write_bytes(storage.join(url, TENSORS_FILE), payload)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "ddm.clustering",
            "config": self.config.model_dump(),
            "dim": self.dim,
            "tensors": TENSORS_FILE,
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        storage.write_json(storage.join(url, META_FILE), meta)

    @classmethod
    def load(cls, url: str) -> Clustering:
        meta_url = storage.join(url, META_FILE)
        meta = storage.read_json(meta_url)
        if not isinstance(meta, dict) or meta.get("kind") != "ddm.clustering":
            raise ValueError(f"{meta_url}: not a ddm clustering (no kind 'ddm.clustering')")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_url}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
            )
        tensors_url = storage.join(url, str(meta.get("tensors", TENSORS_FILE)))
        raw = storage.read_bytes(tensors_url)
        if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
            raise ValueError(
                f"{tensors_url}: checksum does not match {meta_url}; the save was interrupted or files were mixed"
            )
        try:
            arrays = st_load(raw)
            config = ClusterConfig(**meta["config"])
            return cls(
                fine_centroids=arrays["fine_centroids"],
                fine_to_coarse=arrays["fine_to_coarse"],
                coarse_centroids=arrays["coarse_centroids"],
                fine_sizes=arrays["fine_sizes"],
                config=config,
            )
        except (SafetensorError, KeyError, TypeError) as e:
            raise ValueError(f"{url}: incomplete or invalid clustering ({e})") from None


def _balanced_by_cells(
    cells: np.ndarray, cost: np.ndarray, num_cells: int, lower: int, upper: int
) -> np.ndarray:
    """Balanced labels: a transportation LP over fine cells (whole cells move), then the points of
    the cells the LP splits are placed by :func:`balanced_assign` within the remaining room."""
    k = cost.shape[1]
    sizes = np.bincount(cells, minlength=num_cells)  # (F,)
    used = np.flatnonzero(sizes)
    cell_cost = np.stack(
        [np.bincount(cells, weights=cost[:, c], minlength=num_cells) for c in range(k)], axis=1
    )
    unit = cell_cost[used] / sizes[used, None]  # (F', k) mean cost per point
    flow = _transport(unit, sizes[used], lower, upper)  # (F', k)
    whole = np.abs(flow - sizes[used, None]) < 1e-6  # (F', k): the cell goes entirely to this cluster
    cell_label = np.full(num_cells, -1, dtype=np.int64)
    is_whole = whole.any(axis=1)
    cell_label[used[is_whole]] = np.argmax(whole[is_whole], axis=1)
    labels = cell_label[cells]  # (N,), -1 for points of split cells
    loose = np.flatnonzero(labels < 0)
    if len(loose):
        fixed = np.bincount(labels[labels >= 0], minlength=k)
        labels[loose] = balanced_assign(
            cost[loose], lower=np.maximum(lower - fixed, 0), upper=np.maximum(upper - fixed, 0)
        )
    return labels


# ---------------------------------------------------------------------------------------------------
# fitting


def fit_clustering(feats: np.ndarray, cfg: ClusterConfig) -> tuple[Clustering, np.ndarray]:
    """Fit fine and coarse centroids on ``feats`` (N, D) and return the clustering and its labels (N,).

    Fine spherical k-means runs on a seeded sample of ``cfg.sample_size`` points; coarse k-means on
    the fine centroids weighted by how many of the N points are nearest each. With
    ``cfg.balanced``, the grouping is re-optimised under the size bounds (constrained k-means) and
    the labels come from ``Clustering.assign(feats, balanced=True)``, so reloading the clustering
    and assigning the same features reproduces them exactly.
    """
    if not isinstance(cfg, ClusterConfig):
        raise ValueError(f"cfg must be a ClusterConfig, got {type(cfg).__name__}")
    x = normalize_features(feats)
    n = len(x)
    if cfg.fine_k > n:
        raise ValueError(
            f"ClusterConfig.fine_k ({cfg.fine_k}) must be <= the number of points N ({n}); lower fine_k"
        )
    rng = np.random.default_rng(cfg.seed)
    m = min(cfg.sample_size, n)
    sample = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
    fine = spherical_kmeans(x[sample], cfg.fine_k, cfg.niter, cfg.seed)  # (F, D)
    cells = _nearest(x, fine)  # (N,)
    sizes = np.bincount(cells, minlength=cfg.fine_k).astype(np.int64)  # (F,)
    if (sizes > 0).sum() < cfg.k:
        raise ValueError(
            f"only {(sizes > 0).sum()} distinct fine cells for k={cfg.k} clusters; "
            "the features have too few distinct points"
        )
    coarse = spherical_kmeans(
        fine, cfg.k, cfg.niter, cfg.seed, weights=sizes.astype(np.float32), restarts=_COARSE_RESTARTS
    )
    fine_to_coarse = _nearest(fine, coarse)  # (F,)
    if cfg.balanced and cfg.k > 1:
        lower, upper = size_bounds(n, cfg.k, cfg.tolerance)
        fine_to_coarse, coarse = _balanced_grouping(fine, sizes, coarse, lower, upper, cfg)
    clustering = Clustering(
        fine_centroids=fine,
        fine_to_coarse=fine_to_coarse.astype(np.int64),
        coarse_centroids=coarse.astype(np.float32),
        fine_sizes=sizes,
        config=cfg,
    )
    labels = clustering.assign(x, balanced=cfg.balanced)
    return clustering, labels


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index (N,) int64 of the most cosine-similar centroid for unit rows of x (ties: lowest index)."""
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), _CHUNK):
        out[s : s + _CHUNK] = np.argmax(x[s : s + _CHUNK] @ centroids.T, axis=1)
    return out


def _balanced_grouping(
    fine: np.ndarray, sizes: np.ndarray, coarse: np.ndarray, lower: int, upper: int, cfg: ClusterConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Constrained spherical k-means on the fine centroids weighted by their sizes (Bradley et al.):
    assign cells to clusters by the transportation LP under ``[lower, upper]``, move each coarse
    centroid to the normalised weighted mean of what it received, repeat until the map is stable.
    Starts from the unbalanced solution and from k-means++ seeds; the lowest objective wins."""
    k = cfg.k
    used = np.flatnonzero(sizes)
    w = sizes[used]
    seeds = [np.random.default_rng(cfg.seed + 1000 + r) for r in range(_GROUPING_RESTARTS)]
    starts = [coarse] + [_kmeanspp_seed(fine[used], w.astype(np.float32), k, rng) for rng in seeds]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for centroids in starts:
        prev = None
        for _ in range(cfg.niter):
            unit = 1.0 - fine[used].astype(np.float64) @ centroids.T.astype(np.float64)  # (F', k)
            flow = _transport(unit, w, lower, upper)  # (F', k)
            owner = np.argmax(flow, axis=1)  # (F',) majority cluster of each cell
            moved = flow.T @ fine[used].astype(np.float64)  # (k, D)
            norms = np.linalg.norm(moved, axis=1, keepdims=True)
            centroids = np.where(norms > 0, moved / np.maximum(norms, 1e-12), centroids).astype(np.float32)
            if prev is not None and np.array_equal(owner, prev):
                break
            prev = owner
        unit = 1.0 - fine[used].astype(np.float64) @ centroids.T.astype(np.float64)
        flow = _transport(unit, w, lower, upper)
        obj = float((flow * unit).sum())
        if best is None or obj < best[0] - 1e-9:
            best = (obj, flow, centroids)
    assert best is not None
    _, flow, centroids = best
    fine_to_coarse = _nearest(fine, centroids)  # empty cells: nearest coarse centroid
    fine_to_coarse[used] = np.argmax(flow, axis=1)
    for c in range(k):  # every cluster owns at least one cell, so point costs to it are defined
        if not (fine_to_coarse == c).any():
            fine_to_coarse[used[np.argmax(flow[:, c])]] = c
    return fine_to_coarse, centroids


# ---------------------------------------------------------------------------------------------------
# reporting


def cluster_report(labels: np.ndarray, k: int) -> dict[str, Any]:
    """Sizes per cluster and imbalance = largest / smallest (inf when a cluster is empty)."""
    lab = np.asarray(labels)
    if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {lab.dtype} {lab.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if lab.size and (lab.min() < 0 or lab.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}), got [{lab.min()}, {lab.max()}]")
    sizes = np.bincount(lab, minlength=k)
    smallest, largest = int(sizes.min()), int(sizes.max())
    return {
        "n": int(lab.size),
        "k": int(k),
        "sizes": [int(s) for s in sizes],
        "min": smallest,
        "max": largest,
        "imbalance": (largest / smallest) if smallest > 0 else math.inf,
    }
