"""Clustering for partitions (ddm.coordinator.cluster), with real faiss and HiGHS on small data.

Checks: well-separated blobs come back exactly; a seed fixes the result (whatever the thread count);
the balanced assignment is the exact optimum of its transportation problem (against scipy's HiGHS
LP), keeps every cluster within tolerance and moves barely more points than the minimum forced by
the bounds; a saved and reloaded clustering assigns points as the fit did; bad inputs raise a
ValueError naming the field.
"""

from __future__ import annotations

import math
import uuid

import faiss
import numpy as np
import pytest
from scipy import sparse
from scipy.optimize import linprog

from ddm.coordinator.cluster import (
    ClusterConfig,
    Clustering,
    balanced_assign,
    cluster_report,
    fit_clustering,
    normalize_features,
    size_bounds,
    spherical_kmeans,
)


def blobs(sizes: list[int], dim: int = 16, sep: float = 10.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs (unit noise) around centres at distance ``sep`` from the origin in random
    directions: after L2 normalisation they are well separated on the sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim))
    centres *= sep / np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    x = centres[truth] + rng.normal(size=(len(truth), dim))
    perm = rng.permutation(len(truth))  # interleave, so nothing depends on the order of the rows
    return x[perm].astype(np.float32), truth[perm]


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    return table


def is_same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a permutation of the labels: every row and column of the contingency table has one non-zero."""
    table = contingency(a, b)
    return bool(((table > 0).sum(axis=1) == 1).all() and ((table > 0).sum(axis=0) == 1).all())


def lp_optimum(cost: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
    """The transportation LP solved by HiGHS: an independent optimum to compare against."""
    n, k = cost.shape
    cols = np.arange(n * k)
    a_eq = sparse.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), cols)), shape=(n, n * k))
    per = sparse.csr_matrix((np.ones(n * k), (np.tile(np.arange(k), n), cols)), shape=(k, n * k))
    res = linprog(
        cost.ravel(), A_ub=sparse.vstack([per, -per]), b_ub=np.r_[upper, -lower], A_eq=a_eq, b_eq=np.ones(n),
        bounds=(0, 1), method="highs",
    )  # fmt: skip
    assert res.status == 0
    return float(res.fun)


def partition_objective(x: np.ndarray, labels: np.ndarray) -> float:
    """The k-means objective of a partition: squared distances to the cluster means."""
    return float(sum(((x[labels == c] - x[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels)))


def skewed_costs(n: int, k: int, seed: int) -> np.ndarray:
    """Squared distances to k centres of points drawn 70% from the first centre's blob."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, 16)) * 3
    truth = rng.choice(k, size=n, p=[0.7] + [0.3 / (k - 1)] * (k - 1))
    x = centres[truth] + rng.normal(size=(n, 16))
    return ((x[:, None, :] - centres[None]) ** 2).sum(-1)  # (n, k)


# ---------------------------------------------------------------------------------------------------
# fitting


def test_well_separated_blobs_are_recovered_exactly() -> None:
    x, truth = blobs([500, 500, 500, 500])
    for balanced in (False, True):
        clustering, labels = fit_clustering(x, ClusterConfig(k=4, fine_k=32, balanced=balanced))
        assert labels.shape == (2000,) and labels.dtype == np.int64
        assert is_same_partition(labels, truth), contingency(truth, labels)
    # the centroids are unit vectors and each coarse centroid points at its blob's mean direction
    assert np.allclose(np.linalg.norm(clustering.fine_centroids, axis=1), 1, atol=1e-5)
    xn = normalize_features(x)
    for c in range(4):
        mean_dir = xn[labels == c].mean(0)
        assert mean_dir @ clustering.coarse_centroids[c] / np.linalg.norm(mean_dir) > 0.999


def test_unequal_blobs_unbalanced_keeps_each_blob_whole() -> None:
    x, truth = blobs([1400, 200, 200, 200])
    _, labels = fit_clustering(x, ClusterConfig(k=4, fine_k=32, balanced=False))
    assert is_same_partition(labels, truth), contingency(truth, labels)
    assert cluster_report(labels, 4)["imbalance"] == pytest.approx(7.0)


def test_same_seed_gives_identical_results_and_thread_count_does_not_matter() -> None:
    x, _ = blobs([300, 200, 100], dim=8, sep=3.0)  # overlapping blobs: ties and choices do occur
    cfg = ClusterConfig(k=3, fine_k=24, sample_size=400, seed=7)
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        one, labels_one = fit_clustering(x, cfg)
        faiss.omp_set_num_threads(2)
        two, labels_two = fit_clustering(x, cfg)
        again, labels_again = fit_clustering(x, cfg)
    finally:
        faiss.omp_set_num_threads(threads)
    for c, lab in ((two, labels_two), (again, labels_again)):
        np.testing.assert_array_equal(lab, labels_one)
        np.testing.assert_array_equal(c.fine_centroids, one.fine_centroids)
        np.testing.assert_array_equal(c.fine_to_coarse, one.fine_to_coarse)
    other, _ = fit_clustering(x, ClusterConfig(k=3, fine_k=24, sample_size=400, seed=8))
    assert not np.array_equal(other.fine_centroids, one.fine_centroids)  # the seed is really used


def test_spherical_kmeans_matches_lloyd_fixed_point() -> None:
    """At convergence every centroid is the normalised mean of the points nearest to it."""
    x, _ = blobs([300, 300, 300], dim=8, sep=6.0)
    xn = normalize_features(x)
    centroids = spherical_kmeans(x, 3, niter=30, seed=0)
    assert centroids.shape == (3, 8) and centroids.dtype == np.float32
    nearest = np.argmax(xn @ centroids.T, axis=1)
    for c in range(3):
        mean = xn[nearest == c].mean(0)
        np.testing.assert_allclose(centroids[c], mean / np.linalg.norm(mean), atol=1e-5)


def test_balanced_fit_on_skewed_blobs_is_within_tolerance() -> None:
    sizes = [2800, 400, 400, 400]  # 70 / 10 / 10 / 10 %
    x, truth = blobs(sizes)
    cfg = ClusterConfig(k=4, fine_k=64, balanced=True, tolerance=0.05)
    clustering, labels = fit_clustering(x, cfg)
    lower, upper = size_bounds(4000, 4, 0.05)
    assert (lower, upper) == (950, 1050)
    report = cluster_report(labels, 4)
    assert all(lower <= s <= upper for s in report["sizes"]), report
    assert report["imbalance"] <= 1050 / 950 + 1e-12
    # Balancing splits the big blob but keeps the small blobs together (two may share a cluster:
    # that is cheaper than three clusters each half filled from the big blob).
    table = contingency(truth, labels)
    assert all(table[b].max() >= 0.95 * sizes[b] for b in (1, 2, 3)), table
    # Re-grouping the fine cells under the bounds (constrained k-means) is at least about as good,
    # in the k-means objective, as balancing the unbalanced grouping's cells without re-grouping.
    unbalanced, greedy = fit_clustering(x, cfg.model_copy(update=dict(balanced=False)))
    assert cluster_report(greedy, 4)["imbalance"] == pytest.approx(7.0)  # nearest-centroid: unbalanced
    xn = normalize_features(x)
    regrouped = partition_objective(xn, labels)
    assert regrouped <= 1.02 * partition_objective(xn, unbalanced.assign(x, balanced=True))
    # Whole fine cells move: nearly every point is still in the coarse cluster of its nearest fine
    # centroid under the saved (balanced) map, so `ddm assign` reproduces the partition.
    assert (clustering.assign(x) == labels).mean() > 0.97


# ---------------------------------------------------------------------------------------------------
# balanced assignment on its own


@pytest.mark.parametrize(
    ("n", "k", "tol", "seed"), [(600, 2, 0.05, 0), (900, 3, 0.0, 1), (1200, 4, 0.05, 2), (800, 8, 0.1, 3)]
)
def test_balanced_assign_is_the_lp_optimum_and_moves_few_points(
    n: int, k: int, tol: float, seed: int
) -> None:
    cost = skewed_costs(n, k, seed)
    lower, upper = size_bounds(n, k, tol)
    labels = balanced_assign(cost, lower=lower, upper=upper)
    counts = np.bincount(labels, minlength=k)
    assert ((counts >= lower) & (counts <= upper)).all(), counts
    ours = cost[np.arange(n), labels].sum()
    best = lp_optimum(cost, np.full(k, lower), np.full(k, upper))
    assert ours == pytest.approx(best, rel=1e-9, abs=1e-9)
    # Against greedy nearest-centroid: it is unbalanced, and we move hardly more points than the
    # minimum any balanced assignment must move (the excess above upper, or the deficit below lower).
    # (The optimum minimises distance, not the count: on heavily overlapping blobs a chain of short
    # moves a -> b -> c can beat one long move a -> c, and then more points move.)
    nearest = np.argmin(cost, axis=1)
    before = np.bincount(nearest, minlength=k)
    assert before.max() > upper
    forced = max(np.maximum(before - upper, 0).sum(), np.maximum(lower - before, 0).sum())
    moved = int((labels != nearest).sum())
    assert forced <= moved <= math.ceil(1.15 * forced) + 2


def test_balanced_assign_beats_greedy_capacity_filling() -> None:
    """Greedy 'most confident point first, to its best cluster with room' fills clusters in order:
    with a tolerance it leaves the last cluster short of the lower bound, with exact balance it
    is feasible but pays more and moves more points than the optimum."""
    n, k = 1200, 4
    cost = skewed_costs(n, k, seed=5)
    nearest = np.argmin(cost, axis=1)

    def greedy(upper: int) -> np.ndarray:
        order = np.argsort(-(np.sort(cost, axis=1)[:, 1] - cost.min(axis=1)), kind="stable")
        out = np.empty(n, dtype=np.int64)
        room = np.full(k, upper)
        for i in order:
            c = min((j for j in range(k) if room[j] > 0), key=lambda j: cost[i, j])
            out[i] = c
            room[c] -= 1
        return out

    lower, upper = size_bounds(n, k, 0.05)
    assert np.bincount(greedy(upper), minlength=k).min() < lower  # greedy is not balanced
    counts = np.bincount(balanced_assign(cost, lower=lower, upper=upper), minlength=k)
    assert ((counts >= lower) & (counts <= upper)).all()
    lower, upper = size_bounds(n, k, 0.0)  # exact balance: greedy meets the lower bound too
    ours, theirs = balanced_assign(cost, lower=lower, upper=upper), greedy(upper)
    assert (np.bincount(theirs, minlength=k) == n // k).all()
    ours_cost, greedy_cost = cost[np.arange(n), ours].sum(), cost[np.arange(n), theirs].sum()
    assert ours_cost < 0.95 * greedy_cost
    assert (ours != nearest).sum() < (theirs != nearest).sum()
    assert ours_cost == pytest.approx(lp_optimum(cost, np.full(k, lower), np.full(k, upper)), rel=1e-9)


def test_balanced_assign_with_ties_and_per_cluster_bounds() -> None:
    # 100 identical points: every price threshold is a tie, so the repair must finish the job.
    cost = np.tile(np.array([0.0, 1.0, 2.0, 3.0]), (100, 1))
    labels = balanced_assign(cost, lower=24, upper=26)
    assert np.bincount(labels, minlength=4).tolist() == [26, 26, 24, 24]  # cheapest clusters full
    # per-cluster bounds, including a cluster that must stay empty and one that must take exactly 30
    cost = skewed_costs(300, 4, seed=9)
    lower, upper = np.array([0, 30, 50, 0]), np.array([0, 30, 200, 250])
    labels = balanced_assign(cost, lower=lower, upper=upper)
    counts = np.bincount(labels, minlength=4)
    assert counts[0] == 0 and counts[1] == 30 and 50 <= counts[2] <= 200 and counts[3] <= 250
    assert cost[np.arange(300), labels].sum() == pytest.approx(lp_optimum(cost, lower, upper), rel=1e-9)
    assert (balanced_assign(cost[:, :1], lower=0, upper=300) == 0).all()  # one cluster


def test_size_bounds() -> None:
    assert size_bounds(100, 4, 0.05) == (24, 26)
    assert size_bounds(100, 4, 0.0) == (25, 25)
    assert size_bounds(10, 3, 0.0) == (3, 4)  # widened to what integers allow
    assert size_bounds(10, 4, 0.0) == (2, 3)
    assert size_bounds(7, 1, 0.0) == (7, 7)


# ---------------------------------------------------------------------------------------------------
# assigning new data and persistence


@pytest.fixture(params=["local", "memory"])
def clustering_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "clusters" / "clustering")
    return f"memory://{uuid.uuid4().hex}/clusters/clustering"


def test_save_load_round_trip_and_assign_reproduces_fit(clustering_url: str) -> None:
    x, _ = blobs([400, 300, 300], seed=3)
    for balanced in (True, False):  # the unbalanced one last: new points are checked against it below
        clustering, labels = fit_clustering(x, ClusterConfig(k=3, fine_k=24, balanced=balanced, seed=2))
        clustering.save(clustering_url)
        loaded = Clustering.load(clustering_url)
        for name in ("fine_centroids", "fine_to_coarse", "coarse_centroids", "fine_sizes"):
            got, want = getattr(loaded, name), getattr(clustering, name)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        assert loaded.config == clustering.config
        np.testing.assert_array_equal(loaded.assign(x, balanced=balanced), labels)
    # new points from the same blobs land with their blob (unbalanced assignment of the last fit)
    x_new, truth_new = blobs([400, 300, 300], seed=3)  # same centres, fresh noise below
    rng = np.random.default_rng(11)
    x_new = x_new + rng.normal(scale=0.3, size=x_new.shape).astype(np.float32)
    assert is_same_partition(loaded.assign(x_new), truth_new)
    np.testing.assert_array_equal(loaded.assign(x_new), clustering.assign(x_new))


def test_load_rejects_a_tampered_or_missing_clustering(tmp_path) -> None:
    x, _ = blobs([100, 100])
    clustering, _ = fit_clustering(x, ClusterConfig(k=2, fine_k=8, balanced=False))
    url = str(tmp_path / "c")
    clustering.save(url)
    tensors = tmp_path / "c" / "clustering.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 0xFF
    tensors.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        Clustering.load(url)
    with pytest.raises(FileNotFoundError):
        Clustering.load(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": 5, "fine_k": 4}, "fine_k"),
        ({"fine_k": 64, "sample_size": 10}, "sample_size"),
        ({"niter": 0}, "niter"),
        ({"tolerance": -0.1}, "tolerance"),
        ({"tolerance": 1.5}, "tolerance"),
        ({"seed": -1}, "seed"),
        ({"k": 2.0}, "k"),
        ({"balanced": "yes"}, "balanced"),
    ],
)
def test_bad_config_raises_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(
        ValueError, match=rf"ClusterConfig\n(  Value error, )?{field}\b|ClusterConfig\n{field}\n"
    ):
        ClusterConfig(**kwargs)


def test_the_cluster_settings_are_defined_once() -> None:
    """ClusterConfig and the run config's [partition] share their fields, defaults and bounds (once the
    fit's default tolerance was 0.05 and the run's 0.04); the pipeline copies them with one call."""
    from ddm.coordinator.config import ClusterSettings, PartitionConfig

    for name in ClusterSettings.model_fields:
        assert repr(ClusterConfig.model_fields[name]) == repr(PartitionConfig.model_fields[name]), name
    assert ClusterConfig().tolerance == PartitionConfig().tolerance == 0.04
    p = PartitionConfig(k=3, fine_k=12, tolerance=0.1, encoder="pixels")
    assert ClusterConfig(**p.cluster_settings()) == ClusterConfig(k=3, fine_k=12, tolerance=0.1)


def test_bad_features_raise_naming_the_problem() -> None:
    x, _ = blobs([50, 50])
    cfg = ClusterConfig(k=2, fine_k=8)
    with pytest.raises(ValueError, match=r"fine_k \(8\) must be <= the number of points"):
        fit_clustering(x[:5], cfg)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="feats has non-finite values.*row 3"):
        fit_clustering(bad, cfg)
    with pytest.raises(ValueError, match="feats must be 2-D"):
        fit_clustering(x[0], cfg)
    with pytest.raises(ValueError, match="feats must be a float array"):
        fit_clustering((x * 100).astype(np.int32), cfg)
    with pytest.raises(ValueError, match="feats must be a numpy array"):
        fit_clustering(x.tolist(), cfg)
    zero = x.copy()
    zero[7] = 0
    with pytest.raises(ValueError, match="feats row 7 is all zeros"):
        fit_clustering(zero, cfg)
    clustering, _ = fit_clustering(x, cfg)
    with pytest.raises(ValueError, match="16"):
        clustering.assign(x[:, :8])


def test_bad_balanced_assign_inputs() -> None:
    cost = np.zeros((10, 3))
    with pytest.raises(ValueError, match=r"sum\(lower\)=12 must be <= N"):
        balanced_assign(cost, lower=4, upper=5)
    with pytest.raises(ValueError, match=r"sum\(upper\)=9"):
        balanced_assign(cost, lower=0, upper=3)
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        balanced_assign(cost, lower=np.array([5, 0, 0]), upper=np.array([4, 10, 10]))
    with pytest.raises(ValueError, match="cost must be 2-D"):
        balanced_assign(np.zeros(10), lower=0, upper=10)
    with pytest.raises(ValueError, match="non-finite"):
        balanced_assign(np.full((10, 3), np.inf), lower=0, upper=10)
    with pytest.raises(ValueError, match="upper must be"):
        balanced_assign(cost, lower=0, upper=np.array([5, 5]))


def test_cluster_report() -> None:
    report = cluster_report(np.array([0, 0, 0, 1, 2, 2]), 3)
    assert report["sizes"] == [3, 1, 2] and report["imbalance"] == 3.0 and report["n"] == 6
    assert cluster_report(np.array([0, 0, 1]), 3)["imbalance"] == math.inf
    with pytest.raises(ValueError, match="labels must lie in"):
        cluster_report(np.array([0, 3]), 3)
