"""Unlabelled data (num_classes 0) trains unconditional experts and an unconditional router, and the
guided ensemble samples from them: every label is the null class 0 (docs/data.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rgb_shapes import shapes, write_folder

from ddm.expert.config import DataConfig, ExpertJobConfig
from ddm.expert.data import build_dataset
from ddm.expert.evaluate import balanced_labels
from ddm.expert.guidance import with_guidance
from ddm.expert.load import load_denoiser
from ddm.expert.sampling import sample
from ddm.expert.shards import write_shards
from ddm.expert.trainer import train
from ddm.router.config import RouterJobConfig
from ddm.router.ensemble import Ensemble
from ddm.router.model import load_router
from ddm.router.trainer import train as train_router

TRAIN = dict(steps=3, batch_size=8, warmup_steps=1, checkpoint_every=1000, log_every=1, num_threads=1, seed=3)


def expert_job(root: Path, k: int, num_classes: int) -> ExpertJobConfig:
    return ExpertJobConfig.model_validate({
        "name": f"expert-{k}", "output": str(root / "experts" / f"expert-{k}"),
        "data": {"source": "shards", "path": str(root / "partitions" / f"expert-{k}"), "image_size": 16,
                 "channels": 3},
        "model": {"arch": "DiT-T/4", "num_classes": num_classes}, "train": TRAIN,
    })  # fmt: skip


@pytest.mark.slow  # two expert and one router training runs: ~20 s of CPU
def test_unlabelled_data_trains_and_samples_unconditionally(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "pics", shapes(32, size=16, seed=5), labelled=False)
    data = build_dataset(DataConfig(source="unlabelled-folder", path=str(folder), image_size=16, channels=3))
    assert data.num_classes == 0 and data.class_names is None
    root = tmp_path / "run"
    for k, part in enumerate((data.subset(slice(0, 16)), data.subset(slice(16, 32)))):
        write_shards(str(root / "partitions" / f"expert-{k}"), part.images, part.labels, part.ids,
                     num_classes=0, shard_size=8)  # fmt: skip

    with pytest.raises(
        ValueError, match=r"unlabelled \(0 classes\) but model.num_classes is 10; set model.num"
    ):
        train(expert_job(root, 0, 10), progress=False)
    experts = []
    for k in range(2):
        result = train(expert_job(root, k, 0), progress=False)
        experts.append(load_denoiser(result.checkpoint_url))
    assert all(e.num_classes == 0 for e in experts)

    router_job = RouterJobConfig.model_validate({
        "name": "router", "output": str(root / "router"), "data": {"root": str(root), "k": 2},
        "model": {"arch": "Router-XS/4", "num_classes": 0}, "train": TRAIN, "eval": {"samples_per_bin": 4},
    })  # fmt: skip
    router = train_router(router_job, progress=False)
    ensemble = Ensemble(experts, load_router(router.checkpoint_url), strategy="full")
    y = balanced_labels(4, ensemble.num_classes)
    assert y.tolist() == [0, 0, 0, 0]  # the null class
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = sample(ensemble, noise, y, steps=3)
    guided = sample(with_guidance(ensemble, 3.0), noise, y, steps=3)
    assert plain.shape == (4, 3, 16, 16) and torch.isfinite(plain).all()
    # conditional and unconditional velocities are the same call, so guidance changes nothing
    torch.testing.assert_close(guided, plain, atol=1e-5, rtol=1e-5)


def test_unconditional_labels_are_the_null_class_everywhere(tmp_path: Path) -> None:
    from ddm.coordinator.sample_cmd import parse_labels
    from ddm.expert.data import DataError, ImageDataset
    from ddm.proto.ddm.v1 import ddm_pb2 as pb
    from ddm.router.config import SampleDefaults
    from ddm.router.sample_request import BadRequest, parse_request

    assert parse_labels("cycle", 3, 0).tolist() == [0, 0, 0] and parse_labels("null", 2, 0).tolist() == [0, 0]
    with pytest.raises(ValueError, match="unconditional; use --labels cycle or null"):
        parse_labels("1", 2, 0)
    params = parse_request(pb.SampleRequest(n=3), SampleDefaults(), num_classes=0, num_experts=2)
    assert params.labels.tolist() == [0, 0, 0]
    with pytest.raises(BadRequest, match="the model is unconditional: send no labels or only 0"):
        parse_request(pb.SampleRequest(n=1, labels=[1]), SampleDefaults(), num_classes=0, num_experts=2)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(DataError, match="must have every label 0, the null class"):
        ImageDataset(images, torch.tensor([0, 1]), torch.arange(2), num_classes=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        write_shards(str(tmp_path / "p"), images, torch.tensor([0, 1]), torch.arange(2), num_classes=0)
