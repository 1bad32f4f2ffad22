"""Curation: exact and near duplicates are found, counted, and the first copy is kept."""

import numpy as np
import torch

from ddm.coordinator.config import CurateConfig
from ddm.coordinator.curate import curate, exact_duplicates, near_duplicates
from ddm.expert.data import ImageDataset


def dataset(images: torch.Tensor) -> ImageDataset:
    n = len(images)
    return ImageDataset(
        images=images, labels=torch.zeros(n, dtype=torch.long), ids=torch.arange(n), num_classes=1
    )


def test_exact_duplicates_keep_the_first_copy():
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=gen)
    imgs[3] = imgs[1]
    imgs[5] = imgs[1]
    assert exact_duplicates(imgs).tolist() == [False, False, False, True, False, True]


def test_near_duplicates_by_cosine():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 64)).astype(np.float32)  # random directions: cosines near 0
    feats = np.concatenate([base, base[:10] + 0.01 * rng.normal(size=(10, 64)).astype(np.float32)])
    match, cosine = near_duplicates(feats, 0.99, pca_dim=32)
    assert (match[200:] == np.arange(10)).all() and (cosine[200:] > 0.99).all()
    originals_matched = match[:10]
    assert (originals_matched == np.arange(200, 210)).all()  # symmetric: the original sees its copy
    assert (match[10:200] == -1).all()


def test_curate_counts_and_removes_each_kind():
    rng = np.random.default_rng(1)
    n = 100
    imgs = torch.from_numpy(rng.integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8))
    imgs[50] = imgs[7]  # exact copy
    feats = rng.normal(size=(n, 32)).astype(np.float32)
    feats[50] = feats[7]
    feats[60] = feats[20] * 1.5 + 1e-4  # a near duplicate (same direction), different pixels
    result = curate(dataset(imgs), feats, CurateConfig(near_duplicate_cosine=0.999))
    assert result.exact_duplicates == 1 and result.near_duplicates == 1
    assert set(range(n)) - set(result.keep.tolist()) == {50, 60}
    assert result.pairs and result.pairs[0][:2] == (60, 20)


def test_blank_embeddings_are_removed_and_counted():
    imgs = torch.arange(4 * 4, dtype=torch.uint8).reshape(4, 1, 2, 2)
    feats = np.eye(4, 3, dtype=np.float32)  # row 3 is all zero: no direction to cluster by
    feats[1, 0] = np.nan
    result = curate(dataset(imgs), feats, CurateConfig())
    assert result.degenerate == 2 and result.keep.tolist() == [0, 2]


def test_curate_disabled_keeps_everything():
    imgs = torch.zeros(5, 1, 2, 2, dtype=torch.uint8)
    result = curate(dataset(imgs), np.ones((5, 3), np.float32), CurateConfig(enabled=False))
    assert result.keep.tolist() == [0, 1, 2, 3, 4] and result.exact_duplicates == 0
