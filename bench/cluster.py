"""Clustering benchmark: faiss spherical k-means against scikit-learn, balancing, and embedding speed.

    python bench/cluster.py [--quick] [--n 100000] [--dim 256] [--fine-k 256] [--niter 20] [--k 8]

Measures, on one Gaussian mixture in 256-d (64 components, Zipf-distributed weights, per-component
spread and a rank-8 anisotropy; L2-normalised, as encoder features are before clustering):
  * ``faiss_speedup``: scikit-learn ``KMeans`` (defaults: k-means++ init, Lloyd; n_init=1, the same
    k and max_iter, tol=0 so it runs every iteration) time / ours (``spherical_kmeans`` = k-means++
    seeding on a sample + faiss Lloyd, then labels) on the same normalised data. Also printed:
    scikit-learn with ``init="random"`` (faiss' own default), where both do the same Lloyd work.
  * ``inertia_ratio``: our inertia / scikit-learn's, both as the sum of squared distances of each
    point to the mean of its cluster (the k-means objective of each partition, on the same data;
    our spherical centroids are unit vectors, so they are replaced by the partition means here —
    otherwise the comparison would charge us for a different centroid rule, not a worse partition).
  * ``imbalance_greedy`` / ``imbalance_balanced``: largest / smallest cluster of ``fit_clustering``
    without / with balancing, on the skewed mixture (k clusters, default 8 as in the paper).
  * ``embed_images_per_s``: ``ddm.expert.features.embed`` on Fashion-MNIST images (null, with a note
    on stderr, when that module or the data is missing).
Prints readable lines, then one JSON object as the LAST line. ``--quick`` uses N=20,000 and 256
images (about 2 min on a loaded 2-core machine, most of it scikit-learn's seeding); the full run
took ~7 min there (scikit-learn's k-means++ on 100k points alone ~3 min).
scikit-learn is needed for the comparison only: ``pip install scikit-learn``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import faiss
import numpy as np
from scipy import sparse

from ddm.coordinator.cluster import (
    ClusterConfig,
    cluster_report,
    fit_clustering,
    normalize_features,
    spherical_kmeans,
)


def mixture(n: int, dim: int, components: int, seed: int) -> np.ndarray:
    """Skewed, anisotropic Gaussian mixture, L2-normalised: (n, dim) float32."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, components + 1) ** 1.1  # Zipf: the largest component holds ~20%
    weights /= weights.sum()
    means = rng.normal(size=(components, dim)) * 0.35
    spread = rng.uniform(0.15, 0.35, size=components)
    basis = rng.normal(size=(components, 8, dim)) * 0.12  # a few directions of larger variance
    comp = rng.choice(components, size=n, p=weights)
    x = means[comp] + rng.normal(size=(n, dim)) * spread[comp, None]
    x += np.einsum("nr,nrd->nd", rng.normal(size=(n, 8)), basis[comp])
    return normalize_features(x.astype(np.float32))


def labels_of(x: np.ndarray, centroids: np.ndarray, chunk: int = 8192) -> np.ndarray:
    out = np.empty(len(x), dtype=np.int64)
    for s in range(0, len(x), chunk):
        out[s : s + chunk] = np.argmax(x[s : s + chunk] @ centroids.T, axis=1)
    return out


def partition_inertia(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float]:
    """(sum of squared distances to the cluster means, sum of 1 - cos to the normalised means)."""
    onehot = sparse.csr_matrix((np.ones(len(x)), (labels, np.arange(len(x)))), shape=(k, len(x)))
    sums = np.asarray(onehot @ x.astype(np.float64))  # (k, D)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sq_norms = float((x.astype(np.float64) ** 2).sum())
    nonempty = counts > 0
    inertia = sq_norms - float(((sums[nonempty] ** 2).sum(1) / counts[nonempty]).sum())
    cosine = float(counts.sum() - np.linalg.norm(sums, axis=1).sum())  # sum_i (1 - <x_i, mean_c/|mean_c|>)
    return inertia, cosine


def set_threads(n: int) -> None:
    """Same thread budget for both sides: faiss' OpenMP, and every BLAS/OpenMP pool threadpoolctl finds
    (numpy's OpenBLAS, scikit-learn's OpenMP). On a loaded 2-core machine one thread is often faster."""
    faiss.omp_set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(
            "note: threadpoolctl (installed with scikit-learn) is missing; only faiss threads were set",
            file=sys.stderr,
        )
        return
    threadpool_limits(n)


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def compare_with_sklearn(x: np.ndarray, k: int, niter: int, seed: int) -> dict[str, Any]:
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        print(
            "note: scikit-learn is not installed, so faiss_speedup and inertia_ratio are null; "
            "`pip install scikit-learn` to compare (it is a benchmark-only dependency)",
            file=sys.stderr,
        )
        return {"faiss_speedup": None, "inertia_ratio": None}
    labels, t_ours = timed(lambda: labels_of(x, spherical_kmeans(x, k, niter, seed)))
    ours, ours_cos = partition_inertia(x, labels, k)
    print(
        f"ours (k-means++ on a sample + faiss spherical Lloyd, {niter} it): {t_ours:.2f} s, inertia {ours:.1f}"
    )

    def sk(init: str) -> Any:
        return KMeans(
            k, init=init, n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=seed
        ).fit(x)

    km, t_pp = timed(lambda: sk("k-means++"))
    theirs, theirs_cos = partition_inertia(x, km.labels_, k)
    print(
        f"scikit-learn KMeans (k-means++, lloyd, n_init=1, tol=0): {t_pp:.2f} s, inertia {theirs:.1f} (its inertia_ {km.inertia_:.1f})"
    )
    km_r, t_rand = timed(lambda: sk("random"))
    rand, _ = partition_inertia(x, km_r.labels_, k)
    print(f"scikit-learn KMeans (init='random'):                   {t_rand:.2f} s, inertia {rand:.1f}")
    print(
        f"speedup vs k-means++ {t_pp / t_ours:.1f}x (most of scikit-learn's time is its full-data seeding); "
        f"vs init='random' {t_rand / t_ours:.2f}x (both Lloyd loops are BLAS-bound)"
    )
    print(f"inertia ratio ours/sklearn {ours / theirs:.4f} (squared distance to partition means); "
          f"cosine objective ratio {ours_cos / theirs_cos:.4f}; vs sklearn random init {ours / rand:.4f}")  # fmt: skip
    return {
        "faiss_speedup": t_pp / t_ours,
        "inertia_ratio": ours / theirs,
        "sklearn_random_init_speedup": t_rand / t_ours,
        "ours_kmeans_s": t_ours,
        "sklearn_kmeans_s": t_pp,
    }


def balance(x: np.ndarray, cfg: ClusterConfig, tolerances: tuple[float, ...], tag: str) -> dict[str, Any]:
    """Imbalance without and with balancing, and what balancing costs in k-means objective."""
    k = cfg.k
    plain, t_plain = timed(lambda: fit_clustering(x, cfg.model_copy(update=dict(balanced=False))))
    clustering, greedy = plain
    base, _ = partition_inertia(x, greedy, k)
    rep = cluster_report(greedy, k)
    print(
        f"[{tag}] nearest-centroid: sizes {rep['sizes']} imbalance {rep['imbalance']:.3f} (fit {t_plain:.1f} s)"
    )
    out: dict[str, Any] = {"imbalance_greedy": _finite(rep["imbalance"]), "fit_clustering_s": t_plain}
    for tol in tolerances:
        (_, labels), t_bal = timed(
            lambda tol=tol: fit_clustering(x, cfg.model_copy(update=dict(balanced=True, tolerance=tol)))
        )
        rep = cluster_report(labels, k)
        inertia, _ = partition_inertia(x, labels, k)
        # the same cells balanced without re-grouping (LP over the unbalanced grouping): what the
        # constrained k-means step buys
        naive = clustering.assign(x, balanced=True, tolerance=tol)
        naive_inertia, _ = partition_inertia(x, naive, k)
        print(
            f"[{tag}] balanced tol={tol}: sizes {rep['sizes']} imbalance {rep['imbalance']:.3f} "
            f"(bound {(1 + tol) / (1 - tol):.3f}; fit {t_bal:.1f} s); k-means objective +{100 * (inertia / base - 1):.2f}% "
            f"vs unbalanced (+{100 * (naive_inertia / base - 1):.2f}% when balancing without re-grouping)"
        )
        out[f"imbalance_balanced_tol{tol:g}"] = _finite(rep["imbalance"])
        out[f"fit_clustering_balanced_s_tol{tol:g}"] = t_bal
        out[f"balanced_objective_increase_tol{tol:g}"] = inertia / base - 1
    return out


def _finite(v: float) -> float | None:
    return None if math.isinf(v) else v


def embedding(n_images: int) -> tuple[float | None, np.ndarray | None]:
    try:
        from ddm.expert.features import embed
    except ImportError as e:
        print(
            f"note: ddm.expert.features is not available ({e}); embed_images_per_s is null", file=sys.stderr
        )
        return None, None
    try:
        from ddm.expert.data import load_fashion_mnist

        images = load_fashion_mnist(split="train", limit=n_images).images  # uint8 (N, 1, 28, 28)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"note: Fashion-MNIST is not available ({e}); embed_images_per_s is null", file=sys.stderr)
        return None, None
    embed(images[:32], batch_size=32)  # load the model and warm up outside the timed window
    feats, seconds = timed(lambda: embed(images, batch_size=64))
    rate = len(images) / seconds
    print(
        f"embed: {len(images)} Fashion-MNIST images in {seconds:.1f} s = {rate:.1f} img/s, features {feats.shape}"
    )
    return rate, feats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=20,000 and fewer embedded images (< 2 min)")
    parser.add_argument("--n", type=int, default=None, help="points (default 100,000; 20,000 with --quick)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument(
        "--fine-k", type=int, default=256, help="k of the scikit-learn comparison = fine centroids"
    )
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--k", type=int, default=8, help="coarse clusters for the balance figures")
    parser.add_argument("--tolerance", type=float, default=0.04,
                        help="tolerance of imbalance_balanced; without --quick 0.05 (the config default) is measured too")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="limit faiss, BLAS and scikit-learn to N threads alike (default: their own defaults)")  # fmt: skip
    args = parser.parse_args()
    if args.threads is not None:
        set_threads(args.threads)
    n = args.n or (20_000 if args.quick else 100_000)
    t_start = time.perf_counter()
    print(
        f"threads: faiss {faiss.omp_get_max_threads()}; data: {n} x {args.dim} Gaussian mixture, L2-normalised"
    )

    x = mixture(n, args.dim, components=64, seed=args.seed)
    out: dict[str, Any] = {"n": n, "dim": args.dim, "fine_k": args.fine_k, "niter": args.niter, "k": args.k}
    out.update(compare_with_sklearn(x, args.fine_k, args.niter, args.seed))

    cfg = ClusterConfig(
        k=args.k, fine_k=args.fine_k, niter=args.niter, seed=args.seed, tolerance=args.tolerance
    )
    print(
        f"fit_clustering: fine k-means on a {min(n, cfg.sample_size)}-point sample, coarse k={cfg.k}, all {n} points assigned"
    )
    # the default config's tolerance too (its bound (1.05)/(0.95) = 1.105), except in --quick
    tolerances = (args.tolerance,) if args.quick else tuple(dict.fromkeys((args.tolerance, 0.05)))
    bal = balance(x, cfg, tolerances, "mixture")
    out["imbalance_greedy"] = bal["imbalance_greedy"]
    out["imbalance_balanced"] = bal[f"imbalance_balanced_tol{args.tolerance:g}"]
    out["tolerance"] = args.tolerance
    out.update({key: v for key, v in bal.items() if key not in ("imbalance_greedy",)})

    rate, feats = embedding(256 if args.quick else 2048)
    out["embed_images_per_s"] = rate
    if feats is not None:  # the same figures on real encoder features (Fashion-MNIST, balanced classes)
        real_cfg = ClusterConfig(
            k=4, fine_k=min(64, len(feats) // 8), niter=args.niter, seed=args.seed, tolerance=args.tolerance
        )
        real = balance(feats, real_cfg, (args.tolerance,), "fashion-mnist features")
        out["real_imbalance_greedy"] = real["imbalance_greedy"]
        out["real_imbalance_balanced"] = real[f"imbalance_balanced_tol{args.tolerance:g}"]
    out["wall_s"] = time.perf_counter() - t_start
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
