"""A small CNN classifier of the real data, used to score class-conditional samples.

Class accuracy of generated images = the fraction this classifier labels as the class they were asked
for. It is trained in-repo (nothing can be downloaded), once per dataset: ``get_classifier`` trains on
the first call and loads the cached checkpoint afterwards. Three epochs on Fashion-MNIST take about a
minute on 2 otherwise idle CPU cores and score ~90% on the real test split, which is the ceiling for
generated samples (measured: 89.9% after 3 epochs at width 16, 89.2% after 2).

The network trains and predicts on ``device`` (fp32); batches are copied there and predictions come
back to the host. It is initialised on the CPU from its seed, so the same seed starts from the same
weights on any device (a GPU's kernels still make its numbers differ slightly from a CPU's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ddm.core import checkpoint, storage
from ddm.core.device import to_device
from ddm.core.progress import progress_bar
from ddm.expert.config import DataConfig
from ddm.expert.data import ImageDataset, build_dataset
from ddm.expert.images import to_model_range

__all__ = [
    "CLASSIFIER_VERSION",
    "Classifier",
    "ClassifierTrainConfig",
    "SmallCNN",
    "class_accuracy",
    "classifier_cache_dir",
    "get_classifier",
    "recipe_for",
    "split_train_test",
    "train_classifier",
]

log = logging.getLogger(__name__)

CLASSIFIER_VERSION = 1  # bump when the architecture or training recipe changes: old caches are not reused


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; input float (N, C, H, W) in [-1, 1], any H, W >= 8."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width

        def block(c_in: int, c_out: int) -> nn.Sequential:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)  # BatchNorm supplies the bias
            return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(
            block(in_channels, width),
            nn.MaxPool2d(2),
            block(width, 2 * width),
            nn.MaxPool2d(2),
            block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(3),  # 28 px: 7x7 -> 3x3; other sizes land on the same head
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * width * 9, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, num_classes)

    def config(self) -> dict[str, int]:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "width": self.width}


@dataclass(frozen=True, kw_only=True)
class ClassifierTrainConfig:
    """How the classifier is trained; part of the cache key."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 16
    seed: int = 0
    limit: int | None = None  # train on the first N examples only (quick tests)
    holdout: float = 0.1  # sources without a test split: this fraction of the data is held out

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.width < 1:
            raise ValueError(
                f"epochs, batch_size and width must be >= 1, got {self.epochs}, {self.batch_size}, {self.width}"
            )
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")


class Classifier:
    """A trained SmallCNN plus the metadata it was saved with (test accuracy, data identity, time)."""

    def __init__(
        self, model: SmallCNN, meta: dict[str, Any], *, loaded_from_cache: bool, url: str | None = None,
        device: str | torch.device = "cpu",
    ):  # fmt: skip
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.loaded_from_cache = loaded_from_cache
        self.url = url

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def test_accuracy(self) -> float | None:
        return self.meta.get("test_accuracy")

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Logits (N, num_classes) on the host, of uint8 images or floats in [-1, 1], shape (N, C, H, W)."""
        if images.ndim != 4 or images.shape[1] != self.model.in_channels:
            raise ValueError(
                f"classifier expects (N, {self.model.in_channels}, H, W) images, got {tuple(images.shape)}"
            )
        self.model.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = to_device(images[i : i + batch_size], self.device)  # uint8 crosses as uint8
            x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
            out.append(self.model(x).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels (N,) int64."""
        return self.logits(images, batch_size).argmax(dim=1)


def class_accuracy(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels`` (the classes they were generated for)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("class_accuracy needs at least one image")
    return float((classifier.predict(images) == labels.to(torch.long)).float().mean())


# ---------------------------------------------------------------------------------------------------
# training


def _evaluate(model: SmallCNN, data: ImageDataset, batch_size: int = 512) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x, y = data.batch(torch.arange(start, min(start + batch_size, len(data))))  # (B, C, H, W), (B,)
            x, y = to_device(x, device), to_device(y, device)
            correct += int((model(x).argmax(dim=1) == y).sum())
    return correct / max(1, len(data))


def train_classifier(
    train: ImageDataset, cfg: ClassifierTrainConfig, *, test: ImageDataset | None = None, progress: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[SmallCNN, dict[str, Any]]:  # fmt: skip
    """Train a SmallCNN on ``device`` with AdamW and a one-cycle schedule; returns (model in eval mode on
    ``device``, stats).

    Deterministic for a seed (own generator for initialisation and shuffling; the global RNG is untouched).
    """
    device = torch.device(device)
    if len(train) < 2:
        raise ValueError(f"the classifier needs at least 2 training images, got {len(train)}")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = SmallCNN(train.image_shape[0], train.num_classes, cfg.width).to(
            device
        )  # initialised on the CPU
        gen = torch.Generator().manual_seed(cfg.seed)
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.2)
        start_time = time.time()
        model.train()
        with progress_bar(total=total, disable=not progress, desc="classifier", unit="step") as bar:
            for _ in range(cfg.epochs):
                order = torch.randperm(len(train), generator=gen)
                for i in range(steps_per_epoch):
                    index = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]  # (B,)
                    x, y = train.batch(index)  # (B, C, H, W), (B,)
                    x, y = to_device(x, device), to_device(y, device)
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        train_seconds = time.time() - start_time
    model.eval()
    stats: dict[str, Any] = {
        "steps": total,
        "train_seconds": round(train_seconds, 2),
        "train_examples": len(train),
        "final_loss": float(loss.item()),
        "test_accuracy": _evaluate(model, test) if test is not None and len(test) else None,
        "test_examples": len(test) if test is not None else 0,
    }
    return model, stats


MIN_STEPS = 150  # a small dataset trains for more epochs: 3 epochs of a few hundred images are a few steps


def recipe_for(
    num_images: int, base: ClassifierTrainConfig = ClassifierTrainConfig()
) -> ClassifierTrainConfig:
    """``base`` with enough epochs for at least ``MIN_STEPS`` optimizer steps on ``num_images`` images
    (the training part: ``1 - holdout`` of them); Fashion-MNIST's 54,000 keep the 3 epochs."""
    per_epoch = max(1, math.ceil(num_images * (1 - base.holdout) / base.batch_size))
    return replace(base, epochs=max(base.epochs, math.ceil(MIN_STEPS / per_epoch)))


def split_train_test(data_cfg: DataConfig, cfg: ClassifierTrainConfig) -> tuple[ImageDataset, ImageDataset]:
    """(train, test) for the classifier: Fashion-MNIST's own splits, else a seeded holdout of the data."""
    if data_cfg.source == "fashion-mnist":
        train = build_dataset(data_cfg.model_copy(update={"split": "train", "limit": cfg.limit}))
        test = build_dataset(data_cfg.model_copy(update={"split": "test", "limit": None}))
        return train, test
    data = build_dataset(data_cfg.model_copy(update={"limit": cfg.limit}))
    n_test = max(1, round(len(data) * cfg.holdout))
    if len(data) - n_test < 2:
        raise ValueError(f"{data_cfg.path}: {len(data)} images are too few to train and test a classifier")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
    return data.subset(perm[n_test:]), data.subset(perm[:n_test])


# ---------------------------------------------------------------------------------------------------
# cache


def _cache_identity(data_cfg: DataConfig, cfg: ClassifierTrainConfig) -> dict[str, Any]:
    """What the cached classifier depends on: the dataset's identity, the recipe and the code version."""
    data = data_cfg.model_dump()
    data.pop("split")  # the classifier always trains on the training split, whatever split evaluation uses
    data.pop("limit")  # the classifier's own limit is in the recipe
    return {"version": CLASSIFIER_VERSION, "data": data, "train": asdict(cfg)}


def classifier_cache_dir(
    data_cfg: DataConfig, cache_dir: str, cfg: ClassifierTrainConfig = ClassifierTrainConfig()
) -> str:
    """The checkpoint directory of the classifier for this dataset and recipe under ``cache_dir``."""
    identity = json.dumps(_cache_identity(data_cfg, cfg), sort_keys=True)
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return storage.join(cache_dir, f"classifier-{data_cfg.source}-{key}")


def get_classifier(
    data_cfg: DataConfig,
    cache_dir: str,
    cfg: ClassifierTrainConfig = ClassifierTrainConfig(),
    *,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> Classifier:
    """The classifier of ``data_cfg``'s dataset on ``device``: loaded from ``cache_dir`` if trained before,
    else trained there (logging its test accuracy) and saved as a safetensors checkpoint with JSON metadata.

    Pass the whole dataset's config, not one partition's shards: an expert's samples are scored by a
    classifier of all the data. The cache key is the dataset identity (source, path, size, channels),
    the recipe and ``CLASSIFIER_VERSION``; a changed file at the same path is not detected.
    """
    directory = classifier_cache_dir(data_cfg, cache_dir, cfg)
    if checkpoint.latest(directory) is not None:
        ckpt = checkpoint.load(directory)
        model = SmallCNN(**ckpt.meta["arch"])
        model.load_state_dict(ckpt.prefixed("model"), strict=True)
        return Classifier(model, ckpt.meta, loaded_from_cache=True, url=ckpt.url, device=device)

    train, test = split_train_test(data_cfg, cfg)
    log.info("training the evaluation classifier on %d images (%s)", len(train), data_cfg.path)
    model, stats = train_classifier(train, cfg, test=test, progress=progress, device=device)
    log.info(
        "classifier test accuracy %.4f on %d images",
        stats["test_accuracy"] or float("nan"),
        stats["test_examples"],
    )
    meta = {
        "kind": "classifier",
        "arch": model.config(),
        **_cache_identity(data_cfg, cfg),
        **stats,
        "class_names": train.class_names,
        "trained_at": time.time(),
    }
    tensors = {f"model.{k}": v.cpu() for k, v in model.state_dict().items()}
    url = checkpoint.save(directory, stats["steps"], tensors, meta, keep=1)
    return Classifier(model, checkpoint.load(url).meta, loaded_from_cache=False, url=url, device=device)
