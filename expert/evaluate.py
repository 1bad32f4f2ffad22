"""Evaluate any Denoiser: sample class-balanced images, then FD, KID, precision/recall, class accuracy.

Works on anything with ``velocity(x_t, t, y)``: one expert, the router's ensemble, a distilled student,
a remote expert. Guidance and the sampler come from a ``SampleConfig``, exactly as in serving, so the
numbers describe what users get. Images are quantised to uint8 before scoring, as a saved PNG would be.

Outputs under ``out_dir``: ``samples.png`` (one row per class), ``metrics.json``, and ``cache/`` with
the real set's features and statistics (keyed by the images' hash and the feature extractor's name),
so evaluating many checkpoints against one real set embeds it once.

FD is biased upward for small sample counts, so compare runs with equal ``num_samples``. The floor
(Fashion-MNIST train vs the 10k test images, EfficientNet-Lite0 at 96 px) is FD 98 at 1k samples, 51
at 2k, 25 at 5k and 16.8 at 10k; KID (unbiased) is ~0 at every size, precision/recall ~0.80-0.81.

Sampling runs on ``device`` (where the denoiser's networks are): the initial noise is drawn from the
seeded CPU generator and moved there, so a seed gives the same starting noise on any device; finished
batches come back to the host for scoring (the feature extractor and classifier place their own).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load_numpy
from safetensors.numpy import save as st_save_numpy

from ddm.core import storage
from ddm.core.device import to_device
from ddm.core.progress import progress_bar
from ddm.expert.classifier import Classifier
from ddm.expert.config import SampleConfig
from ddm.expert.data import ImageDataset
from ddm.expert.denoiser import Counted, Denoiser
from ddm.expert.features import FeatureExtractor
from ddm.expert.flow import resolve_time_shift
from ddm.expert.guidance import with_guidance
from ddm.expert.images import save_grid, to_uint8
from ddm.expert.metrics import fd_from_stats, feature_stats, kid, precision_recall
from ddm.expert.sampling import CountingDenoiser, sample

__all__ = [
    "EvalResult",
    "RealReference",
    "balanced_labels",
    "evaluate",
    "generate",
    "grid_indices",
    "real_reference",
    "score",
]

log = logging.getLogger(__name__)

GRID_FILE = "samples.png"
METRICS_FILE = "metrics.json"


@dataclass
class EvalResult:
    """Every number one evaluation produces; ``to_dict()`` is what ``metrics.json`` holds."""

    fd: float  # Fréchet distance in ``features`` space (FID only if features is Inception)
    kid_mean: float  # unbiased MMD^2, cubic kernel, mean over subsets
    kid_std: float
    precision: float  # fraction of samples on the real manifold (Kynkäänniemi et al. 2019)
    recall: float  # fraction of real images on the samples' manifold
    class_accuracy: (
        float | None
    )  # fraction the classifier labels as the requested class (None: no classifier)
    per_class_accuracy: list[float | None] | None  # None for classes with no samples
    num_samples: int
    num_real: int
    features: str  # the feature extractor's name
    seconds_per_image: float  # sampling wall time only (no scoring), per generated image
    denoiser_calls_per_sample: float  # rows through the evaluated denoiser per sample (a CFG pair counts 2)
    denoiser_batches: int  # batched velocity() calls on the evaluated denoiser
    sample_config: dict[str, Any]
    seed: int
    eval_seconds: float  # everything: sampling, features, metrics, writing
    classifier_test_accuracy: float | None = None  # the classifier's accuracy on real test data: the ceiling
    grid_path: str | None = None
    metrics_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# sampling


def balanced_labels(num_samples: int, num_classes: int) -> torch.Tensor:
    """(num_samples,) int64 labels 0, 1, ..., C-1, 0, 1, ...: every class within one sample of the others.
    Unlabelled data (C = 0): every label is the null class, 0."""
    return torch.arange(num_samples, dtype=torch.long) % max(num_classes, 1)


def generate(
    denoiser: Denoiser,
    y: torch.Tensor,
    image_shape: tuple[int, int, int],
    sample_cfg: SampleConfig,
    *,
    generator: torch.Generator,
    batch_size: int,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Guided samples for labels y (N,): float (N, C, H, W) on the host, in the model range (not clamped).

    All initial noise is drawn up front (on the CPU generator), so the samples do not depend on
    ``batch_size`` for the deterministic samplers. Each batch is sampled on ``device``.
    """
    device = torch.device(device)
    noise = torch.randn((len(y), *image_shape), generator=generator)  # (N, C, H, W)
    guided = with_guidance(denoiser, sample_cfg.guidance)
    out = []
    with progress_bar(total=len(y), disable=not progress, desc="sampling", unit="img") as bar:
        for start in range(0, len(y), batch_size):
            x = sample(
                guided,
                to_device(noise[start : start + batch_size], device),
                to_device(y[start : start + batch_size], device),
                steps=sample_cfg.steps,
                sampler=sample_cfg.sampler,
                time_grid=sample_cfg.time_grid,
                time_shift=resolve_time_shift(sample_cfg.time_shift, image_shape),
                churn=sample_cfg.churn,
                generator=generator,
            )  # (B, C, H, W)
            out.append(x.cpu())
            bar.update(len(x))
    return torch.cat(out)


def grid_indices(
    labels: torch.Tensor, num_classes: int, *, max_cols: int = 10, max_rows: int = 16
) -> tuple[list[int], int]:
    """(indices, columns) for a grid with one row per class (first ``max_rows`` classes present) and
    the same number of samples of that class in every row."""
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in range(max(num_classes, 1))]
    present = [idx for idx in per_class if idx][:max_rows]
    cols = min(max_cols, min(len(idx) for idx in present)) if present else 0
    return [i for idx in present for i in idx[:cols]], cols


# ---------------------------------------------------------------------------------------------------
# the real reference


@dataclass
class RealReference:
    """The real set in feature space: features (N, D) and their mean (D,) and covariance (D, D)."""

    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    key: str
    from_cache: bool


def _reference_key(real: ImageDataset, features: FeatureExtractor) -> str:
    h = hashlib.sha256()
    h.update(features.name.encode())
    h.update(str(tuple(real.images.shape)).encode())
    h.update(real.images.contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def real_reference(
    real: ImageDataset, features: FeatureExtractor, cache_dir: str | None = None
) -> RealReference:
    """Features and statistics of ``real``, read from ``cache_dir`` when this exact set (hash of its
    pixels) was already embedded with this extractor, else computed and written there."""
    key = _reference_key(real, features)
    url = storage.join(cache_dir, f"real-{key}.safetensors") if cache_dir else None
    if url is not None and storage.exists(url):
        try:
            t = st_load_numpy(storage.read_bytes(url))
            return RealReference(t["features"].astype(np.float64), t["mu"], t["sigma"], key, from_cache=True)
        except (
            SafetensorError,
            KeyError,
            ValueError,
        ) as e:  # a corrupt cache entry is recomputed, never trusted
            log.warning("%s: unreadable reference cache (%s); recomputing", url, e)
    feats = np.asarray(features(real.images), dtype=np.float64)  # (N, D)
    mu, sigma = feature_stats(feats)
    if url is not None:
        payload = st_save_numpy(
            {"features": feats.astype(np.float32), "mu": mu, "sigma": sigma},
            metadata={"features": features.name, "num_images": str(len(real))},
        )
        storage.write_bytes(url, payload)
        feats = feats.astype(np.float32).astype(np.float64)  # identical to what a cache hit returns
    return RealReference(feats, mu, sigma, key, from_cache=False)


# ---------------------------------------------------------------------------------------------------
# evaluation


def evaluate(
    denoiser: Denoiser,
    *,
    real: ImageDataset,
    num_samples: int,
    sample_cfg: SampleConfig,
    features: FeatureExtractor,
    classifier: Classifier | None = None,
    seed: int = 0,
    batch_size: int = 250,
    out_dir: str | None = None,
    cache_dir: str | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    progress: bool = False,
    device: str | torch.device = "cpu",
    codec: Any = None,
) -> EvalResult:
    """Sample ``num_samples`` class-balanced images from ``denoiser`` (its networks on ``device``) and
    score them against ``real``. With ``codec`` (a ``ddm.expert.autoencoder.LatentCodec``) the denoiser
    works on latents: samples are decoded before scoring, so every figure is in pixel space.

    FD and KID use all of ``real``; precision/recall use a seeded random subset of ``real`` of the same
    size as the samples (the k-NN radii depend on set size). Deterministic for a seed. Writes
    ``samples.png`` and ``metrics.json`` into ``out_dir`` if given; the real set's features are cached
    in ``cache_dir`` (default ``out_dir/cache``).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2 (FD needs a covariance), got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if len(real) < 2:
        raise ValueError(f"the real set needs at least 2 images, got {len(real)}")
    if denoiser.num_classes != real.num_classes:
        raise ValueError(
            f"the denoiser has {denoiser.num_classes} classes but the real set has {real.num_classes}; "
            "evaluate against the dataset the model was trained on"
        )
    if classifier is not None and classifier.num_classes != real.num_classes:
        raise ValueError(
            f"the classifier has {classifier.num_classes} classes but the real set has {real.num_classes}"
        )
    t_start = time.perf_counter()

    # 1. samples
    y = balanced_labels(num_samples, real.num_classes)  # (N,)
    # Rows through the model(s): an ensemble counts its experts' rows itself (it guides itself, so it
    # cannot sit inside a counting wrapper); anything else is counted from outside.
    counted = denoiser if isinstance(denoiser, Counted) else CountingDenoiser(denoiser)
    rows0, batches0 = counted.calls.total_rows, counted.calls.total_batches
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    x = generate(counted, y, sample_shape(real, codec), sample_cfg, generator=gen, batch_size=batch_size,
                 progress=progress, device=device)  # fmt: skip
    x = decode_samples(codec, x, batch_size)  # (N, C, H, W) pixels
    sampling_seconds = time.perf_counter() - t0
    rows, batches = counted.calls.total_rows - rows0, counted.calls.total_batches - batches0
    return score(
        to_uint8(x), y, real=real, features=features, classifier=classifier, sample_cfg=sample_cfg, seed=seed,
        sampling_seconds=sampling_seconds, denoiser_rows=rows, denoiser_batches=batches,
        out_dir=out_dir, cache_dir=cache_dir, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, pr_k=pr_k,
        started=t_start,
    )  # fmt: skip


def sample_shape(real: ImageDataset, codec: Any) -> tuple[int, ...]:
    """What the denoiser samples: the real images' shape, or the codec's latent shape."""
    if codec is None:
        return tuple(real.image_shape)
    return tuple(codec.autoencoder.latent_shape(tuple(real.image_shape)))


def decode_samples(codec: Any, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Latent samples (N, c, h, w) -> pixels (N, C, H, W) in [-1, 1] on the CPU; ``x`` itself without codec."""
    if codec is None:
        return x
    return torch.cat([codec.decode(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)])


def score(
    images: torch.Tensor,
    y: torch.Tensor,
    *,
    real: ImageDataset,
    features: FeatureExtractor,
    classifier: Classifier | None,
    sample_cfg: SampleConfig,
    seed: int,
    sampling_seconds: float,
    denoiser_rows: int,
    denoiser_batches: int,
    out_dir: str | None = None,
    cache_dir: str | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    started: float | None = None,
) -> EvalResult:
    """Score generated uint8 images (N, C, H, W) made for labels y (N,) against ``real``.

    ``evaluate`` calls this after sampling one denoiser; callers that generate differently (e.g. a
    mixture of experts sampled one partition at a time) call it directly with their own counts.
    """
    t_start = time.perf_counter() if started is None else started
    num_samples = len(images)
    if cache_dir is None and out_dir is not None:
        cache_dir = storage.join(out_dir, "cache")

    # 2. feature-space metrics
    ref = real_reference(real, features, cache_dir)
    fake = np.asarray(features(images), dtype=np.float64)  # (N, D)
    mu_f, sigma_f = feature_stats(fake)
    fd = fd_from_stats(ref.mu, ref.sigma, mu_f, sigma_f)
    kid_mean, kid_std = kid(ref.features, fake, kid_subsets, kid_subset_size, seed=seed)
    rng = np.random.default_rng(seed)
    n_pr = min(len(real), num_samples)
    real_pr = ref.features[np.sort(rng.choice(len(real), n_pr, replace=False))]
    k = min(pr_k, n_pr - 1)
    precision, recall = precision_recall(real_pr, fake[:n_pr], k=k)

    # 3. class accuracy
    acc = per_class = None
    if classifier is not None:
        hit = (classifier.predict(images) == y).float()  # (N,)
        acc = float(hit.mean())
        per_class = [float(hit[y == c].mean()) if (y == c).any() else None for c in range(real.num_classes)]

    result = EvalResult(
        fd=fd,
        kid_mean=kid_mean,
        kid_std=kid_std,
        precision=precision,
        recall=recall,
        class_accuracy=acc,
        per_class_accuracy=per_class,
        num_samples=num_samples,
        num_real=len(real),
        features=features.name,
        seconds_per_image=sampling_seconds / num_samples,
        denoiser_calls_per_sample=denoiser_rows / num_samples,
        denoiser_batches=denoiser_batches,
        sample_config=sample_cfg.model_dump(),
        seed=seed,
        eval_seconds=0.0,
        classifier_test_accuracy=classifier.test_accuracy if classifier is not None else None,
        extra={
            "reference_from_cache": ref.from_cache,
            "reference_key": ref.key,
            "pr_k": k,
            "pr_num_real": n_pr,
        },
    )

    # 4. outputs
    if out_dir is not None:
        idx, cols = grid_indices(y, real.num_classes)
        result.grid_path = storage.join(out_dir, GRID_FILE)
        save_grid(images[idx], result.grid_path, nrow=cols, labels=y[idx], label_names=real.class_names)
        result.metrics_path = storage.join(out_dir, METRICS_FILE)
    result.eval_seconds = time.perf_counter() - t_start
    if result.metrics_path is not None:
        storage.write_json(result.metrics_path, result.to_dict())
    log.info(
        "eval %s: FD %.3f KID %.5f±%.5f P %.3f R %.3f acc %s (%d samples, %.3f s/img)",
        features.name,
        fd,
        kid_mean,
        kid_std,
        precision,
        recall,
        "n/a" if acc is None else f"{acc:.3f}",
        num_samples,
        result.seconds_per_image,
    )
    return result
