"""evaluate() end to end on real denoisers: an untrained DiT, an exact memorising denoiser, pure noise."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from ddm.core import storage
from ddm.expert.classifier import ClassifierTrainConfig, get_classifier
from ddm.expert.config import DataConfig, SampleConfig
from ddm.expert.data import ImageDataset, load_fashion_mnist
from ddm.expert.denoiser import ModuleDenoiser
from ddm.expert.evaluate import EvalResult, balanced_labels, evaluate, grid_indices, real_reference
from ddm.expert.features import EfficientNetFeatures, PixelFeatures
from ddm.expert.model import DiT, dit_config

TIMING_FIELDS = {"seconds_per_image", "eval_seconds"}


class EmpiricalDenoiser:
    """The exact marginal velocity of the empirical distribution of ``images`` (per class).

    E[x_0 | x_t] is a softmax-weighted mean of the training images with weights
    exp(-|x_t - (1 - t) x_i|^2 / (2 t^2)); sampling it returns (almost exactly) training images of
    the requested class, so it is a perfect memoriser: a "model" whose samples are real data.
    """

    def __init__(self, data: ImageDataset):
        x0, self.labels = data.batch(torch.arange(len(data)))
        self.x0 = x0.flatten(1).double()  # (M, D)
        self.num_classes = data.num_classes

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x_t.flatten(1).double()  # (N, D)
        a = (1 - t.double())[:, None]  # (N, 1)
        s = t.double()[:, None]  # (N, 1), > 0: samplers never evaluate t = 0
        # |x - a x_i|^2 = |x|^2 - 2 a x.x_i + a^2 |x_i|^2
        d2 = (
            (x * x).sum(1, keepdim=True) - 2 * a * (x @ self.x0.T) + a**2 * (self.x0 * self.x0).sum(1)[None]
        )  # (N, M)
        logits = -d2 / (2 * s**2)
        other_class = (self.labels[None, :] != y[:, None]) & (y[:, None] != self.num_classes)  # (N, M)
        logits = logits.masked_fill(other_class, -math.inf)
        x0_hat = torch.softmax(logits, dim=1) @ self.x0  # (N, D)
        eps_hat = (x - a * x0_hat) / s
        return (eps_hat - x0_hat).view_as(x_t).to(x_t.dtype)


class ZeroDenoiser:
    """v = 0: the sampler returns its initial Gaussian noise."""

    num_classes = 10

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)


@pytest.fixture(scope="module")
def real():
    return load_fashion_mnist(split="test", limit=100)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    cfg = ClassifierTrainConfig(epochs=2, limit=2000, width=8, batch_size=64)
    return get_classifier(DataConfig(), str(tmp_path_factory.mktemp("clf")), cfg)


def tiny_dit() -> ModuleDenoiser:
    torch.manual_seed(0)
    cfg = dit_config("DiT-T/4", image_size=28, in_channels=1, num_classes=10)
    return ModuleDenoiser(DiT(cfg).eval(), num_classes=10)


def without_timing(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMING_FIELDS}


def test_evaluate_untrained_dit_writes_png_json_and_caches_reference(tmp_path, real, classifier):
    out = str(tmp_path / "eval")
    sample_cfg = SampleConfig(steps=2, sampler="euler", guidance=3.0)
    kwargs = {
        "real": real,
        "num_samples": 20,
        "sample_cfg": sample_cfg,
        "features": EfficientNetFeatures(),
        "classifier": classifier,
        "seed": 0,
        "batch_size": 8,
        "out_dir": out,
        "kid_subsets": 5,
    }
    res = evaluate(tiny_dit(), **kwargs)

    assert isinstance(res, EvalResult)
    for name in ("fd", "kid_mean", "kid_std", "precision", "recall", "class_accuracy", "seconds_per_image"):
        assert math.isfinite(getattr(res, name)), name
    assert res.fd > 0 and 0 <= res.precision <= 1 and 0 <= res.recall <= 1 and 0 <= res.class_accuracy <= 1
    assert len(res.per_class_accuracy) == 10
    assert res.features == "efficientnet-lite0@96" and res.num_samples == 20 and res.num_real == 100
    assert res.denoiser_calls_per_sample == 2 * 2  # CFG: conditional + unconditional row per step
    assert res.denoiser_batches == 2 * 3  # 2 steps x 3 batches (8, 8, 4)
    assert res.classifier_test_accuracy == classifier.test_accuracy

    saved = json.loads(storage.read_bytes(res.metrics_path))
    assert saved == json.loads(json.dumps(res.to_dict()))
    assert saved["sample_config"]["guidance"] == 3.0
    grid = Image.open(res.grid_path)
    assert grid.height > 3 * grid.width  # 10 rows (one per class) of 2 samples each
    assert not res.extra["reference_from_cache"]
    assert any(n.startswith("real-") for n in storage.listdir(storage.join(out, "cache")))

    again = evaluate(tiny_dit(), **kwargs)  # same seed: same numbers, real features from the cache
    assert again.extra["reference_from_cache"]
    a, b = without_timing(res.to_dict()), without_timing(again.to_dict())
    a["extra"].pop("reference_from_cache"), b["extra"].pop("reference_from_cache")
    assert a == b


def test_memorising_denoiser_scores_far_better_than_noise(real, classifier):
    """Samples that are real images: low FD and KID, high precision and class accuracy; noise: the opposite."""
    cfg = SampleConfig(steps=8, sampler="euler", guidance=1.0)
    kw = {
        "real": real,
        "num_samples": 100,
        "sample_cfg": cfg,
        "features": PixelFeatures(),
        "classifier": classifier,
    }
    good = evaluate(EmpiricalDenoiser(real), **kw)
    bad = evaluate(ZeroDenoiser(), **kw)
    assert good.precision > 0.9 and bad.precision < 0.1
    # k-NN recall is lenient with noise: isolated noise images get huge radii that swallow real images
    assert good.recall > 0.5 and bad.recall < good.recall / 2
    assert good.fd * 10 < bad.fd
    assert good.kid_mean * 10 < bad.kid_mean
    # samples of class c are real images of class c: the classifier agrees as often as on real data
    assert good.class_accuracy > 0.6 and bad.class_accuracy < 0.3
    assert good.denoiser_calls_per_sample == 8  # guidance 1: one conditional call per step


def test_sampler_settings_reach_the_sampler(real):
    heun = evaluate(
        ZeroDenoiser(),
        real=real,
        num_samples=10,
        sample_cfg=SampleConfig(steps=3, sampler="heun", guidance=2.0),
        features=PixelFeatures(),
        kid_subsets=2,
    )
    assert heun.denoiser_calls_per_sample == 2 * (2 * 3 - 1)  # Heun: 2 steps - 1 calls, each a CFG pair
    assert heun.class_accuracy is None and heun.grid_path is None and heun.metrics_path is None

    stochastic = SampleConfig(steps=3, sampler="stochastic", guidance=1.0, churn=1.0)
    kw = {
        "real": real,
        "num_samples": 10,
        "sample_cfg": stochastic,
        "features": PixelFeatures(),
        "kid_subsets": 2,
    }
    dit = tiny_dit()
    r1, r2 = evaluate(dit, seed=1, **kw), evaluate(dit, seed=1, **kw)
    r3 = evaluate(dit, seed=2, **kw)
    assert r1.fd == r2.fd and r1.kid_mean == r2.kid_mean
    assert r1.fd != r3.fd


def test_reference_cache_is_keyed_by_images_and_extractor(tmp_path, real):
    cache = str(tmp_path / "cache")
    first = real_reference(real, PixelFeatures(), cache)
    again = real_reference(real, PixelFeatures(), cache)
    assert not first.from_cache and again.from_cache
    torch.testing.assert_close(torch.from_numpy(first.sigma), torch.from_numpy(again.sigma), rtol=0, atol=0)
    torch.testing.assert_close(
        torch.from_numpy(first.features), torch.from_numpy(again.features), rtol=0, atol=0
    )
    other = real_reference(real.subset(torch.arange(50)), PixelFeatures(), cache)
    assert not other.from_cache and other.key != first.key


def test_balanced_labels_and_grid_layout():
    y = balanced_labels(23, 10)
    assert torch.bincount(y, minlength=10).tolist() == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    idx, cols = grid_indices(y, 10)
    assert cols == 2 and len(idx) == 20
    rows = y[idx].view(10, 2)
    assert (rows == torch.arange(10)[:, None]).all()  # row r holds class r
    idx, cols = grid_indices(balanced_labels(4, 10), 10)
    assert cols == 1 and idx == [0, 1, 2, 3]


def test_evaluate_rejects_mismatched_inputs(real):
    cfg = SampleConfig(steps=1)

    class ThreeClasses(ZeroDenoiser):
        num_classes = 3

    with pytest.raises(ValueError, match="3 classes"):
        evaluate(ThreeClasses(), real=real, num_samples=4, sample_cfg=cfg, features=PixelFeatures())
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(ZeroDenoiser(), real=real, num_samples=1, sample_cfg=cfg, features=PixelFeatures())
