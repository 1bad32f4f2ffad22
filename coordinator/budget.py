"""What each stage of a run will cost, before it runs: analytic FLOPs of every network pass the config
asks for (``expert/model_cost.py``, ``router/model_cost.py``: no weights built), and seconds at a stated
rate. ``ddm run --dry-run`` prints the table and ``ddm run`` prints it at the start, with a warning when
evaluation would cost more than training the experts (issue 13: at a small size it did).

Counted: training at 3 x forward per image (forward + backward); sampling at one forward per row, a
guided step being two rows (conditional and unconditional) through every expert a strategy selects
(top-k: k, full and threshold: all K, at most), plus the routed strategies' router pass per row; the
student's teacher passes. Not counted: curation's embeddings, the eval feature extractor and the small
classifier, data loading, process start-up, checkpoint writes. Seconds assume ``rate`` FLOP/s per job
with the jobs of a stage running one after another; the default rate is what this project measured for
DiT training on 2 CPU cores in fp32 (ARCHITECTURE.md's calibration: about 70 GFLOP/s) — the seconds are
an order of magnitude, the FLOP shares are exact for the passes counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ddm.coordinator.config import MIXTURE, RunConfig, parse_eval_model

CPU_RATE = 70e9  # FLOP/s: DiT-S training at batch 128 on 2 quiet cores, fp32 (440 ms/step, ARCHITECTURE.md)


@dataclass(frozen=True)
class StageCost:
    stage: str
    what: str
    flops: float


def _rows_per_step(guidance: float) -> int:
    return 1 if guidance == 1.0 else 2  # a guided step: conditional + unconditional rows


def estimate(cfg: RunConfig) -> list[StageCost]:
    """The analytic cost of each stage the config runs (a resolved config: shapes and classes set)."""
    from ddm.expert.model import dit_config
    from ddm.expert.model_cost import dit_cost
    from ddm.router.model import router_config
    from ddm.router.model_cost import router_cost

    image = {"image_size": cfg.data.image_size, "in_channels": cfg.data.channels,
             "num_classes": cfg.experts.model.num_classes}  # fmt: skip
    k = 1 if cfg.mode == "monolith" else cfg.partition.k
    expert = dit_cost(dit_config(cfg.experts.model.arch, **image)).flops
    routed = cfg.mode == "experts" and cfg.router.enabled
    router = (
        router_cost(router_config(cfg.router.model.arch, num_experts=max(k, 2), **image)).flops
        if routed
        else 0
    )
    et = cfg.experts.train
    out = [StageCost("experts", f"{k} x {et.steps} steps x batch {et.batch_size}", 3.0 * expert * k * et.steps * et.batch_size)]  # fmt: skip
    if routed and k > 1:
        rt = cfg.router.train
        out.append(StageCost("router", f"{rt.steps} steps x batch {rt.batch_size}", 3.0 * router * rt.steps * rt.batch_size))  # fmt: skip
    if cfg.eval.enabled:
        ev, s = cfg.eval, cfg.eval.sample
        rows = ev.num_samples * s.steps * _rows_per_step(s.guidance)
        models = ["monolith"] if cfg.mode == "monolith" else ev.models
        total = 0.0
        for name in models:
            if name in ("monolith", MIXTURE):
                total += rows * expert
                continue
            m = parse_eval_model(name)
            experts = min(m.top_k, k) if m.strategy == "top-k" else k
            total += rows * (experts * expert + router)
        out.append(
            StageCost("eval", f"{len(models)} model(s) x {ev.num_samples} samples x {s.steps} steps", total)
        )
    if cfg.mode == "experts" and k > 1 and cfg.distill.enabled:
        d = cfg.distill
        student = dit_cost(
            dit_config(d.model.arch, **image, guidance_embed=True, step_embed=d.shortcut.enabled)
        ).flops
        teacher = 2 * expert + (router if d.teacher.kind == "ensemble" else 0)  # a guided teacher row pair
        train = d.train.steps * d.train.batch_size * (3.0 * student + teacher)
        n = d.eval.num_samples or cfg.eval.num_samples
        table = n * (sum(d.eval.ensemble_steps) * 2 * (expert + router) + sum(d.eval.student_steps) * student)
        out.append(
            StageCost(
                "distill", f"{d.train.steps} steps x batch {d.train.batch_size} + the table", train + table
            )
        )
    return out


def warnings(costs: list[StageCost]) -> list[str]:
    by = {c.stage: c.flops for c in costs}
    out = []
    if by.get("eval", 0) > by.get("experts", float("inf")):
        out.append(
            f"eval would cost {by['eval'] / by['experts']:.1f}x the experts' training: lower eval.num_samples, "
            "eval.sample.steps or the eval.models list, or raise the training budget"
        )
    return out


def format_table(costs: list[StageCost], rate: float = CPU_RATE) -> str:
    """The estimate as aligned text lines: stage, what, TFLOPs, share, seconds at ``rate``."""
    total = sum(c.flops for c in costs) or 1.0
    lines = [f"{'stage':<8} {'TFLOPs':>9} {'share':>6} {'~seconds':>9}  what"]
    for c in costs:
        lines.append(
            f"{c.stage:<8} {c.flops / 1e12:>9.2f} {c.flops / total:>6.0%} {c.flops / rate:>9.0f}  {c.what}"
        )
    lines.append(f"(analytic FLOPs of the network passes; seconds at {rate / 1e9:.0f} GFLOP/s, one job at a time: "
                 "an order of magnitude; curation, features and start-up not counted)")  # fmt: skip
    lines += [f"warning: {w}" for w in warnings(costs)]
    return "\n".join(lines)
