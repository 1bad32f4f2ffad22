"""The ``eval`` stage of ``ddm run``: FD, KID, precision/recall and class accuracy of what the run trained.

- monolith mode: the monolith, sampled with the run's guidance and sampler.
- experts mode: each of ``eval.models``: the routed ensemble (top-K or any other routed strategy: the router's
  p(k | x_t, t, c) picks and weighs experts every step) and the *partition mixture* — every sample of
  class c is drawn from expert k with probability n_{k,c} / n_c (the share of class c that partition k
  holds). With perfect experts the mixture is exactly the data distribution, Σ_k p(k|c) p_k(x|c) = p(x|c),
  so it measures the experts themselves, without a router.

Everything lands in ``{root}/eval/NAME/`` (samples.png, metrics.json) and a summary in the manifest.

Every network (experts, router, feature extractor, classifier) runs on one :class:`Placement`, the
run's ``device`` resolved once, and is announced there; ``eval_context`` carries it to ``evaluate``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ddm.coordinator.config import MIXTURE, RunConfig, parse_eval_model
from ddm.coordinator.layout import machine_cache  # noqa: F401  (ddm eval's cache too)
from ddm.core import checkpoint, storage
from ddm.core.placement import Placement
from ddm.expert.data import ImageDataset, build_dataset
from ddm.expert.evaluate import (
    EvalResult,
    balanced_labels,
    decode_samples,
    evaluate,
    generate,
    sample_shape,
    score,
)
from ddm.expert.flow import resolve_time_shift
from ddm.expert.images import to_uint8
from ddm.expert.load import load_denoiser
from ddm.expert.sampling import CountingDenoiser

SUMMARY_KEYS = (
    "fd",
    "kid_mean",
    "precision",
    "recall",
    "class_accuracy",
    "denoiser_calls_per_sample",
    "seconds_per_image",
)


def reference_set(cfg: RunConfig, limit: int = 10_000) -> ImageDataset:
    """Held-out real images: Fashion-MNIST's test split, else a seeded subset of the training data."""
    if cfg.data.source == "fashion-mnist":
        return build_dataset(cfg.data.model_copy(update={"split": "test", "limit": limit}))
    data = build_dataset(cfg.data)
    pick = torch.from_numpy(np.sort(np.random.default_rng(0).permutation(len(data))[:limit]))
    return data.subset(pick)


def classifier_cache(cfg: RunConfig) -> str:
    """Where the classifier and the real set's features are cached: the run root's ``eval/classifier``
    (trained there once, on the run's own images), except Fashion-MNIST on a local root, whose one
    classifier is shared by every run on the machine."""
    if "://" in cfg.root or cfg.data.source != "fashion-mnist":
        return storage.join(cfg.root, "eval", "classifier")
    return machine_cache()


def no_classifier_reason(cfg: RunConfig, real: ImageDataset) -> str | None:
    """Why a run's eval has no class accuracy, or None when it has one (any labelled dataset does)."""
    if not cfg.eval.classifier:
        return "eval.classifier = false"
    if real.num_classes < 2:
        return f"the data has {real.num_classes} class: nothing to classify"
    return None


def summary(result: EvalResult) -> dict[str, Any]:
    return {
        k: (round(v, 5) if isinstance(v, float) else v)
        for k, v in result.to_dict().items()
        if k in SUMMARY_KEYS
    }


def mixture_assignment(y: torch.Tensor, class_counts: np.ndarray, seed: int) -> torch.Tensor:
    """Expert for each label: k ~ n_{k,c} / n_c, seeded. class_counts is (K, C)."""
    counts = np.asarray(class_counts, dtype=np.float64)  # (K, C)
    per_class = counts.sum(axis=0)  # (C,)
    missing = [c for c in y.unique().tolist() if per_class[c] == 0]
    if missing:
        raise ValueError(f"classes {missing} appear in no partition; nothing can sample them")
    probs = counts / per_class  # (K, C): column c is p(k | c)
    rng = np.random.default_rng(seed)
    return torch.tensor([rng.choice(len(counts), p=probs[:, c]) for c in y.tolist()], dtype=torch.long)


def evaluate_mixture(experts: list, class_counts: np.ndarray, *, real: ImageDataset, num_samples: int, sample_cfg,
                     features, classifier, seed: int, batch_size: int, out_dir: str, progress: bool,
                     cache_dir: str | None = None, device: str | torch.device = "cpu",
                     codec: Any = None) -> EvalResult:  # fmt: skip
    """Sample the partition mixture one expert at a time, then score the union like any model."""
    started = time.perf_counter()
    y = balanced_labels(num_samples, real.num_classes)  # (N,)
    owner = mixture_assignment(y, class_counts, seed)  # (N,)
    shape = sample_shape(real, codec)  # pixels, or latents decoded below
    x = torch.empty((num_samples, *shape))
    rows = batches = 0
    t0 = time.perf_counter()
    for k, expert in enumerate(experts):
        idx = torch.nonzero(owner == k).flatten()
        if len(idx) == 0:
            continue
        counter = CountingDenoiser(expert)
        gen = torch.Generator().manual_seed(seed * 1000 + k)
        x[idx] = generate(counter, y[idx], shape, sample_cfg, generator=gen, batch_size=batch_size,
                          progress=progress, device=device)  # fmt: skip
        rows, batches = rows + counter.calls.total_rows, batches + counter.calls.total_batches
    x = decode_samples(codec, x, batch_size)  # (N, C, H, W) pixels: evaluation is in pixel space
    sampling_seconds = time.perf_counter() - t0
    result = score(
        to_uint8(x), y, real=real, features=features, classifier=classifier, sample_cfg=sample_cfg, seed=seed,
        sampling_seconds=sampling_seconds, denoiser_rows=rows, denoiser_batches=batches, out_dir=out_dir, cache_dir=cache_dir,
        started=started,
    )  # fmt: skip
    result.extra["samples_per_expert"] = torch.bincount(owner, minlength=len(experts)).tolist()
    storage.write_json(storage.join(out_dir, "metrics.json"), result.to_dict())
    return result


def routed_ensemble(
    experts: list, router_url: str, model: str, threshold: float, placement: Placement | None = None
):
    """The router-weighted ensemble for a routed eval model name (``parse_eval_model``: top-K or a routed
    strategy's name; the router on ``placement``, default the CPU, where the experts must be too)."""
    from ddm.router.ensemble import Ensemble
    from ddm.router.model import load_router

    placement = placement or Placement.cpu()
    router = load_router(router_url, device=placement.device)
    placement.announce(f"eval: router net ({router_url})")
    m = parse_eval_model(model)
    if m.strategy is None:
        raise ValueError(f"eval model {model!r} is not a routed ensemble")
    return Ensemble(experts, router, strategy=m.strategy, top_k=m.top_k, threshold=threshold)


def eval_context(cfg: RunConfig, *, progress: bool, placement: Placement | None = None) -> dict[str, Any]:
    """What every evaluation of a run shares (real set, feature extractor, classifier, sampling settings,
    the device), as keyword arguments of ``evaluate`` / ``evaluate_mixture``; built once, used for each
    model. ``placement``: where the networks run (default: ``cfg.device`` resolved here)."""
    from ddm.expert.classifier import ClassifierTrainConfig, get_classifier, recipe_for
    from ddm.expert.features import announce_features, build_features

    placement = placement or Placement.resolve(cfg.device)
    ev = cfg.eval
    real = reference_set(cfg, ev.real_samples)
    features = build_features(ev.features, progress=progress, device=placement.device)
    announce_features(features, placement, "eval")
    classifier = None
    if no_classifier_reason(cfg, real) is None:  # trained on the run's own images once, then cached
        data = cfg.data.model_copy(
            update={"limit": None, "split": "train"}
        )  # all of it; a held-out part tests it
        recipe = ClassifierTrainConfig() if cfg.data.source == "fashion-mnist" else recipe_for(len(real))
        classifier = get_classifier(
            data, classifier_cache(cfg), recipe, progress=progress, device=placement.device
        )
        placement.announce("eval: classifier")
    reference_cache = storage.join(
        classifier_cache(cfg), "reference"
    )  # real-set features, keyed by image hash
    codec = run_codec(cfg, placement)
    sample_cfg = ev.sample
    if sample_cfg.time_shift is None:  # unset: the experts' own, by the rule their trainer applied
        shift = resolve_time_shift(cfg.experts.train.time_shift, sample_shape(real, codec))
        sample_cfg = sample_cfg.model_copy(update={"time_shift": shift})
    return dict(real=real, num_samples=ev.num_samples, sample_cfg=sample_cfg, features=features, classifier=classifier,
                seed=0, batch_size=250, progress=progress, cache_dir=reference_cache, device=placement.device,
                codec=codec)  # fmt: skip


def run_codec(cfg: RunConfig, placement: Placement) -> Any:
    """The run's latent codec (its autoencoder with the scale and shift the partition stage recorded), or
    None in pixel space."""
    if not cfg.latent.enabled:
        return None
    from ddm.expert.autoencoder import codec_from_record

    index = storage.read_json(storage.join(cfg.root, "latents", "index.json"))
    return codec_from_record(index, placement.device)


def evaluate_model(cfg: RunConfig, model: str, experts: list, router_url: str | None, out_dir: str,
                   context: dict[str, Any], placement: Placement | None = None) -> EvalResult:  # fmt: skip
    """Evaluate one ``eval.models`` name (``parse_eval_model``), or "monolith" (the single model in
    ``experts``), into ``out_dir``; the router (when the model needs one) loads on ``placement``, which
    must be ``context``'s device."""
    if model == "monolith":
        return evaluate(experts[0], out_dir=out_dir, **context)
    if model == MIXTURE:
        report = storage.read_json(storage.join(cfg.root, "clusters", "report.json"))
        return evaluate_mixture(experts, np.array(report["class_counts"]), out_dir=out_dir, **context)
    if router_url is None:
        raise ValueError(
            f"eval.models asks for {model!r}, which needs the router; enable router or use 'mixture'"
        )
    ensemble = routed_ensemble(experts, router_url, model, cfg.eval.threshold, placement)
    return evaluate(ensemble, out_dir=out_dir, **context)


def load_experts(
    expert_dirs: dict[str, str], placement: Placement | None = None, *, purpose: str = "eval"
) -> list:
    """Each directory's newest checkpoint as a denoiser on ``placement`` (default: the CPU), announced."""
    placement = placement or Placement.cpu()
    experts = [load_denoiser(checkpoint.latest(storage.join(d, "checkpoints")), device=placement.device)
               for d in expert_dirs.values()]  # fmt: skip
    names = ", ".join(expert_dirs)
    placement.announce(
        f"{purpose}: {len(experts)} model(s) ({names})" if len(experts) > 1 else f"{purpose}: {names}"
    )
    return experts


def say_result(name: str, r: dict[str, Any], say=print) -> None:
    acc = r["class_accuracy"]
    acc = f"n/a ({r.get('class_accuracy_note') or 'no classifier'})" if acc is None else round(acc, 3)
    say(
        f"[eval] {name}: FD {r['fd']:.2f}  KID {r['kid_mean']:.4f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
        f"class accuracy {acc}  "
        f"({r['denoiser_calls_per_sample']:.0f} expert calls/sample)"
    )


def run_eval(cfg: RunConfig, expert_dirs: dict[str, str], router_url: str | None, *, progress: bool, say=print,
             placement: Placement | None = None) -> dict[str, Any]:  # fmt: skip
    placement = placement or Placement.resolve(cfg.device)
    context = eval_context(cfg, progress=progress, placement=placement)
    experts = load_experts(expert_dirs, placement)
    models = ["monolith"] if cfg.mode == "monolith" else cfg.eval.models
    note = no_classifier_reason(cfg, context["real"])
    results: dict[str, Any] = {}
    for model in models:
        out = storage.join(cfg.root, "eval", model)
        results[model] = summary(evaluate_model(cfg, model, experts, router_url, out, context, placement))
        if note:
            results[model]["class_accuracy_note"] = note
        say_result(model, results[model], say)
    return results
