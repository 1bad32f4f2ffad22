"""``ddm compare RUN``: the paper's headline on our data — K isolated experts vs a compute-matched monolith.

The monolith is the experts' own recipe (model, optimiser, schedule, steps) with K times an expert's
batch, as the paper does (ImageNet: a monolith at batch 256 against 8 experts at 32 each), so both see
the same number of training images and spend the same training FLOPs; the router's extra cost (the
paper: about 4%) is reported apart. The monolith is trained as its own resumable monolith-mode run
(default root ``RUN/compare/monolith``) through the same pipeline and islands, then every model is
sampled and scored with one evaluation context (same real set, features, classifier, seed, sampler,
steps and guidance) into ``RUN/compare/eval/NAME/``. ``RUN/compare/results.json`` and ``table.md`` hold the
table, ``grid.png`` one labelled row of samples per model. A model already scored under identical
settings is not sampled again, so an interrupted comparison carries on where it stopped. The
coordinator's own networks (the monolith run's embeddings, every model scored) run on the run's
``device`` or ``device=`` given here, resolved once; where they ran is not part of a score's settings.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from ddm.coordinator.config import MIXTURE, RunConfig, eval_models, parse_eval_model
from ddm.core import storage

COLUMNS = (
    "fd",
    "kid_mean",
    "kid_std",
    "precision",
    "recall",
    "class_accuracy",
    "denoiser_calls_per_sample",
    "seconds_per_image",
)


def load_run(root: str) -> RunConfig:
    """The run's config as its manifest holds it, with the data-derived fields filled in where a root
    written by library code (not ``ddm run``, which resolves first) left them unset."""
    from ddm.coordinator.data_shape import is_resolved, resolve_run_config
    from ddm.coordinator.manifest import Manifest
    from ddm.expert.data import build_dataset

    cfg = RunConfig.model_validate(Manifest.load(root).data["config"])
    return cfg if is_resolved(cfg) else resolve_run_config(cfg, build_dataset(cfg.data))


def matched_monolith(cfg: RunConfig, root: str) -> RunConfig:
    """The compute-matched monolith of an experts run: same everything, batch × K, the whole dataset."""
    if cfg.mode != "experts":
        raise ValueError(f"{cfg.root} is a {cfg.mode} run; compare needs an experts run")
    if cfg.latent.enabled:  # the monolith would train on pixels and be scored through the run's decoder
        raise ValueError(
            f"{cfg.root} trains in latent space (latent.autoencoder = {cfg.latent.autoencoder!r}); ddm compare "
            "trains its monolith on pixels and cannot compare it yet (docs/latent.md)"
        )
    k = cfg.partition.k
    threads = cfg.experts.train.num_threads  # unset: torch's choice for the monolith too
    train = cfg.experts.train.model_copy(
        update={
            "batch_size": cfg.experts.train.batch_size * k,
            "num_threads": threads and threads * min(k, 2),
        }
    )
    return cfg.model_copy(
        update={
            "name": f"{cfg.name}-monolith",
            "root": root,
            "mode": "monolith",
            "experts": cfg.experts.model_copy(update={"train": train}),
            "eval": cfg.eval.model_copy(update={"enabled": False}),  # compare scores it with the others
        }
    )


def training_cost(cfg: RunConfig, mono: RunConfig) -> dict[str, dict[str, float]]:
    """Training images and FLOPs (3 × forward: forward + backward) of the experts, the router and the monolith."""
    from ddm.expert.model import dit_config
    from ddm.expert.model_cost import dit_cost
    from ddm.router.model import router_config
    from ddm.router.model_cost import router_cost

    image = {
        "image_size": cfg.data.image_size,
        "in_channels": cfg.data.channels,
        "num_classes": cfg.experts.model.num_classes,
    }

    def cost(images: int, forward_flops: float) -> dict[str, float]:
        return {"images": images, "flops": 3 * forward_flops * images}

    k, et, mt = cfg.partition.k, cfg.experts.train, mono.experts.train
    expert_flops = dit_cost(dit_config(cfg.experts.model.arch, **image)).flops  # analytic: no weights built
    out = {"experts": cost(et.steps * et.batch_size * k, expert_flops)}
    if cfg.router.enabled:
        router = router_cost(router_config(cfg.router.model.arch, num_experts=k, **image))
        out["router"] = cost(cfg.router.train.steps * cfg.router.train.batch_size, router.flops)
    out["monolith"] = cost(
        mt.steps * mt.batch_size, dit_cost(dit_config(mono.experts.model.arch, **image)).flops
    )
    return out


def eval_settings(cfg: RunConfig) -> dict[str, Any]:
    """What makes two scores comparable; a stored score under other settings is recomputed."""
    ev = cfg.eval
    return {"num_samples": ev.num_samples, "features": ev.features, "real_samples": ev.real_samples,
            "classifier": ev.classifier, "threshold": ev.threshold, "sample": ev.sample.model_dump(mode="json")}  # fmt: skip


def train_monolith(
    mono: RunConfig, *, progress: bool, say: Callable[[str], None], placement: Any = None
) -> None:
    from ddm.coordinator.islands import load_islands
    from ddm.coordinator.manifest import Manifest
    from ddm.coordinator.pipeline import Pipeline

    manifest = Manifest.open(mono.root, mono.model_dump(mode="json"))
    Pipeline(mono, load_islands(mono.islands), manifest, progress=progress, say=say, placement=placement).run(
        ("curate", "partition", "experts")
    )


def run_compare(root: str, *, models: list[str] | None = None, monolith_root: str | None = None,
                num_samples: int | None = None, progress: bool = True, device: str | None = None,
                say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> dict[str, Any]:  # fmt: skip
    """Train the matched monolith (if not yet), score it and the run's ensembles, write the table.
    ``device``: where the coordinator's networks run (default: the run config's ``device``)."""
    from ddm.coordinator.eval_stage import eval_context, evaluate_model, load_experts, say_result
    from ddm.coordinator.pipeline import expert_names, expert_output, router_output
    from ddm.core import checkpoint
    from ddm.core.placement import Placement

    root = root if "://" in root else os.path.abspath(root)  # markers name checkpoints by absolute path
    cfg = load_run(root)
    if device is not None:
        cfg = cfg.model_copy(update={"device": device})
    placement = Placement.resolve(cfg.device, field="--device" if device is not None else "device")
    if num_samples is not None:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_samples": num_samples})})
    models = list(models or eval_models())
    for m in models:
        try:
            parse_eval_model(m)
        except ValueError as e:
            raise ValueError(f"--models: {e}") from None
    router_url = checkpoint.latest(storage.join(router_output(cfg), "checkpoints"))
    if router_url is None and any(m != MIXTURE for m in models):
        raise ValueError(
            f"{root}: the router has no checkpoint; finish `ddm run` first (or compare only 'mixture')"
        )
    expert_dirs = {n: expert_output(cfg, n) for n in expert_names(cfg)}
    missing = [n for n, d in expert_dirs.items() if checkpoint.latest(storage.join(d, "checkpoints")) is None]
    if missing:
        raise ValueError(f"{root}: {', '.join(missing)} not trained yet; finish `ddm run` first")

    out_root = storage.join(root, "compare")
    mono = matched_monolith(cfg, monolith_root or storage.join(out_root, "monolith"))
    say(f"[compare] monolith: {mono.experts.model.arch}, batch {mono.experts.train.batch_size} × "
        f"{mono.experts.train.steps} steps at {mono.root}")  # fmt: skip
    train_monolith(mono, progress=progress, say=say, placement=placement)

    settings = eval_settings(cfg)
    context: dict[str, Any] | None = None
    loaded: dict[str, list] = {}
    results: dict[str, Any] = {}
    mono_ckpt = checkpoint.latest(storage.join(expert_output(mono, "monolith"), "checkpoints"))
    expert_ckpts = [checkpoint.latest(storage.join(d, "checkpoints")) for d in expert_dirs.values()]
    for model in ["monolith", *models]:
        out = storage.join(out_root, "eval", model)
        # a score is reused only for the same settings AND the same checkpoints (a retrained or
        # relocated monolith, or experts trained further, are scored again)
        used = (
            [mono_ckpt] if model == "monolith" else expert_ckpts + ([router_url] if model != MIXTURE else [])
        )
        marker = {**settings, "checkpoints": used}
        if scored_with(out, marker):
            results[model] = summary_from(storage.read_json(storage.join(out, "metrics.json")))
            say(f"[compare] {model}: scored before with the same settings, reused")
        else:
            context = context or eval_context(cfg, progress=progress, placement=placement)
            side = "monolith" if model == "monolith" else "experts"
            if side not in loaded:
                dirs = {"monolith": expert_output(mono, "monolith")} if side == "monolith" else expert_dirs
                loaded[side] = load_experts(dirs, placement, purpose=f"compare ({side})")
            result = evaluate_model(cfg, model, loaded[side], router_url, out, context, placement)
            results[model] = summary_from(result.to_dict())
            storage.write_json(storage.join(out, "settings.json"), marker)
        say_result(model, results[model], say)

    # rows, not a mapping: JSON files here are written with sorted keys, and the table keeps this order
    report = {"run": root, "monolith_root": mono.root, "experts": cfg.partition.k, "settings": settings,
              "training": training_cost(cfg, mono), "results": [{"model": m, **r} for m, r in results.items()]}  # fmt: skip
    storage.write_json(storage.join(out_root, "results.json"), report)
    table = markdown_table(report)
    storage.write_bytes(storage.join(out_root, "table.md"), table.encode())
    comparison_grid(
        {m: storage.join(out_root, "eval", m, "samples.png") for m in results},
        storage.join(out_root, "grid.png"),
    )
    print(table)
    return report


def scored_with(out: str, settings: dict[str, Any]) -> bool:
    """Whether ``out`` holds a finished score made under exactly ``settings``."""
    marker, metrics = storage.join(out, "settings.json"), storage.join(out, "metrics.json")
    return storage.exists(metrics) and storage.exists(marker) and storage.read_json(marker) == settings


def summary_from(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics.get(k) for k in COLUMNS}


def markdown_table(report: dict[str, Any]) -> str:
    """The headline table: one row per model, plus the training budget of each side."""
    rows = ["| model | FD ↓ | KID ↓ | precision ↑ | recall ↑ | class acc ↑ | expert calls / sample | s / image |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["results"]:
        name = r["model"]
        acc = "—" if r.get("class_accuracy") is None else f"{100 * r['class_accuracy']:.1f}%"
        rows.append(
            f"| {name} | {r['fd']:.1f} | {r['kid_mean']:.3f} ± {r.get('kid_std') or 0:.3f} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {acc} | {r['denoiser_calls_per_sample']:.0f} | {r['seconds_per_image']:.4f} |"
        )
    s = report["settings"]
    train = report["training"]
    lines = [
        *rows,
        "",
        f"{s['num_samples']} samples per model, {s['sample']['sampler']} {s['sample']['steps']} steps, "
        f"guidance {s['sample']['guidance']}, features {s['features']}, against {s['real_samples']} held-out real images.",
        "Training: "
        + "; ".join(
            f"{name} {v['images']:,} images, {v['flops'] / 1e12:.2f} TFLOPs" for name, v in train.items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def comparison_grid(grids: dict[str, str], url: str, columns: int = 3) -> None:
    """Every model's samples.png (one row per class) side by side under its name, ``columns`` per row."""
    import io

    from PIL import Image, ImageDraw

    panels = []
    for name, grid_url in grids.items():
        if storage.exists(grid_url):
            with Image.open(io.BytesIO(storage.read_bytes(grid_url))) as im:
                panels.append((name, im.convert("L")))
    if not panels:
        return
    title, gap = 16, 12
    w = max(p.width for _, p in panels) + gap
    h = max(p.height for _, p in panels) + title + gap
    rows = -(-len(panels) // columns)
    out = Image.new("L", (w * min(columns, len(panels)), h * rows), 255)
    draw = ImageDraw.Draw(out)
    for i, (name, panel) in enumerate(panels):
        x, y = (i % columns) * w, (i // columns) * h
        draw.text((x + 4, y + 2), name, fill=0)
        out.paste(panel, (x, y + title))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    storage.write_bytes(url, buf.getvalue())
