"""Curation: embed the dataset once (cached on the run root) and drop exact and near duplicates.

Exact duplicates are found by hashing pixels; near duplicates by cosine similarity of the embeddings
with a faiss inner-product index over L2-normalised, PCA-reduced features. Every removal is counted
and a PNG of example near-duplicate pairs is written so a person can judge the threshold.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from ddm.coordinator.config import CurateConfig, PartitionConfig
from ddm.core import storage
from ddm.core.placement import Placement
from ddm.expert.data import ImageDataset

log = logging.getLogger("ddm.curate")


def embed_dataset(data: ImageDataset, cfg: PartitionConfig, cache_url: str, *, progress: bool = True,
                  placement: Placement | None = None) -> np.ndarray:  # fmt: skip
    """(N, D) float32 embeddings of every image; read from ``cache_url`` when a previous run made them.
    The encoder runs on ``placement`` (default: the CPU)."""
    key = f"{cfg.encoder}@{cfg.embed_image_size}|{len(data)}|{hashlib.sha256(data.ids.numpy().tobytes()).hexdigest()[:16]}"
    if storage.exists(cache_url):
        try:
            cached = np_load(storage.read_bytes(cache_url))
            cached_key = str(cached["key"].tobytes(), "utf-8")
        except (SafetensorError, KeyError, UnicodeDecodeError) as e:
            raise ValueError(
                f"{cache_url}: unreadable embeddings cache ({e}); delete it and rerun to recompute"
            ) from None
        if cached_key == key:
            log.info("embeddings: cached at %s", cache_url)
            return cached["features"]
    from ddm.expert.features import announce_features, build_features

    placement = placement or Placement.cpu()
    extractor = build_features(cfg.encoder, image_size=cfg.embed_image_size, batch_size=cfg.embed_batch_size,
                               progress=progress, device=placement.device)  # fmt: skip
    announce_features(extractor, placement, "curation embeddings")
    feats = np.ascontiguousarray(extractor(data.images), dtype=np.float32)  # (N, D)
    storage.write_bytes(
        cache_url, np_save({"features": feats, "key": np.frombuffer(key.encode(), dtype=np.uint8)})
    )
    return feats


@dataclass
class CurationResult:
    keep: np.ndarray  # (M,) indices into the dataset, ascending
    exact_duplicates: int
    near_duplicates: int
    degenerate: int  # embeddings with no direction (all zero or not finite): cannot be clustered
    pairs: list[tuple[int, int, float]]  # (removed, kept, cosine) examples


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


def exact_duplicates(images: torch.Tensor) -> np.ndarray:
    """Boolean (N,): True where the pixels equal an earlier image's exactly."""
    seen: set[bytes] = set()
    dup = np.zeros(len(images), dtype=bool)
    flat = images.reshape(len(images), -1).numpy()
    for i, row in enumerate(flat):
        h = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
        dup[i] = h in seen
        seen.add(h)
    return dup


def near_duplicates(
    feats: np.ndarray, threshold: float, *, neighbours: int = 8, pca_dim: int = 128, seed: int = 0
):
    """For each point, the earliest other point at cosine >= threshold, or -1. Returns (match (N,), cosine (N,)).

    Features are L2-normalised, reduced by PCA to ``pca_dim`` (cosines in the reduced space differ
    slightly; we re-check candidates at full dimension) and searched exactly with faiss.
    """
    x = l2_normalize(np.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0))  # (N, D)
    n, d = x.shape
    reduced = x
    if d > pca_dim and n > pca_dim:
        pca = faiss.PCAMatrix(d, pca_dim)
        pca.train(x[np.random.default_rng(seed).permutation(n)[: min(n, 20_000)]])
        reduced = l2_normalize(pca.apply(x))
    index = faiss.IndexFlatIP(reduced.shape[1])
    index.add(reduced)
    k = min(neighbours + 1, n)
    _, nbrs = index.search(reduced, k)  # (N, k), includes the point itself
    match = np.full(n, -1, dtype=np.int64)
    cosine = np.zeros(n, dtype=np.float32)
    for i in range(n):
        cands = nbrs[i][(nbrs[i] >= 0) & (nbrs[i] != i)]
        if len(cands) == 0:
            continue
        sims = x[cands] @ x[i]  # exact cosine at full dimension
        ok = sims >= threshold
        if ok.any():
            j = int(cands[ok][np.argmax(sims[ok])])
            match[i], cosine[i] = j, float(sims[ok].max())
    return match, cosine


def curate(data: ImageDataset, feats: np.ndarray, cfg: CurateConfig) -> CurationResult:
    n = len(data)
    if not cfg.enabled:
        return CurationResult(np.arange(n), 0, 0, 0, [])
    exact = exact_duplicates(data.images)
    norms = np.linalg.norm(feats, axis=1)
    degenerate = ~np.isfinite(norms) | (norms == 0)
    removed = exact | degenerate
    pairs: list[tuple[int, int, float]] = []
    near = 0
    if cfg.near_duplicate_cosine < 1.0:
        match, cosine = near_duplicates(feats, cfg.near_duplicate_cosine)
        # Keep the first of every near-duplicate group: drop i when it matches a kept point j.
        for i in range(n):
            j = match[i]
            if removed[i] or j < 0 or removed[j]:
                continue
            if j < i:
                removed[i] = True
                near += 1
                pairs.append((i, int(j), float(cosine[i])))
            # j > i: j will be dropped when its turn comes (if it still matches a kept point)
    pairs.sort(key=lambda p: -p[2])
    return CurationResult(
        np.flatnonzero(~removed),
        int(exact.sum()),
        near,
        int((degenerate & ~exact).sum()),
        pairs[: max(cfg.example_pairs, 0)],
    )


def save_pairs_png(data: ImageDataset, pairs: list[tuple[int, int, float]], url: str) -> None:
    """Near-duplicate examples: each row is (removed, kept)."""
    from ddm.expert.images import save_grid

    if not pairs:
        return
    idx = [p for pair in pairs for p in pair[:2]]
    save_grid(data.images[torch.tensor(idx)], url, nrow=2, scale=2)
