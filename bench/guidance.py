"""Guidance modes and routing options side by side on one trained run: FD, KID, class accuracy, cost.

    python bench/guidance.py RUN_CONFIG [--num-samples 500] [--steps 16] [--quick]

RUN_CONFIG is the TOML of a finished run (experts and router trained; ``ddm run CONFIG --stages
curate,partition,experts,router`` is enough). Every setting samples the same class-balanced labels from
the same noise (seed 0) through ``ddm.expert.evaluate.evaluate`` with the run's eval features,
classifier and real set, so the differences between rows are the settings', not the noise's. One
setting is sampled again from other noise (seed 1): the FD/KID noise floor to read the others against.

Settings (guidance_mode x strategy x route_every): both modes with top-1, top-1 in the default mode
routing every 2nd, 4th and 8th step, then both modes with the full ensemble. Cost per sample: expert rows and router
rows through the ensemble's CallCounts (a guided pass counts 2 rows), and sampling wall time per image
(this machine is shared, so wall time is indicative; rows are exact).

Prints a table, then one JSON object as the LAST line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from ddm.coordinator.config import load_run_config
from ddm.coordinator.eval_stage import eval_context, load_experts
from ddm.core import storage
from ddm.expert.evaluate import evaluate
from ddm.router.config import RoutingConfig
from ddm.router.ensemble import Ensemble
from ddm.router.model import load_router

DEFAULT_MODE = RoutingConfig.model_fields["guidance_mode"].default


def settings(quick: bool) -> list[tuple[str, str, int, int]]:
    """(guidance_mode, strategy, route_every, seed) rows; the first is the reference."""
    rows = [
        (DEFAULT_MODE, "top-k", 1, 0),
        (DEFAULT_MODE, "top-k", 1, 1),  # other noise: the noise floor
        ("expert" if DEFAULT_MODE == "ensemble" else "ensemble", "top-k", 1, 0),
        (DEFAULT_MODE, "top-k", 2, 0),
        (DEFAULT_MODE, "top-k", 4, 0),
        (DEFAULT_MODE, "top-k", 8, 0),
        ("ensemble", "full", 1, 0),  # the most expensive rows last: a cut-short run still has the rest
        ("expert", "full", 1, 0),
    ]
    return rows[:3] + rows[4:5] if quick else rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the finished run's config TOML")
    parser.add_argument("--num-samples", type=int, default=500, help="samples per setting (default 500)")
    parser.add_argument("--steps", type=int, default=16, help="Euler steps (default 16)")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale (default 3)")
    parser.add_argument("--quick", action="store_true", help="four settings only")
    args = parser.parse_args()
    cfg = load_run_config(args.config)
    sample_cfg = cfg.eval.sample.model_copy(update={"steps": args.steps, "guidance": args.guidance})
    context = eval_context(cfg, progress=False) | {"num_samples": args.num_samples, "sample_cfg": sample_cfg}
    experts = load_experts({f"expert-{k}": storage.join(cfg.root, "experts", f"expert-{k}")
                            for k in range(cfg.partition.k)})  # fmt: skip
    router_url = storage.join(cfg.root, "router", "checkpoints")
    router = load_router(router_url)
    out: dict[str, object] = {"run": cfg.root, "experts": len(experts), "num_samples": args.num_samples,
                              "steps": args.steps, "guidance": args.guidance, "features": cfg.eval.features}  # fmt: skip
    rows = []
    print(f"{'mode':9s} {'strategy':9s} {'route':>5s} {'seed':>4s} {'FD':>8s} {'KID':>9s} {'acc':>6s} "
          f"{'expert rows':>11s} {'router rows':>11s} {'ms/img':>7s}")  # fmt: skip
    for mode, strategy, route_every, seed in settings(args.quick):
        ens = Ensemble(
            experts, router, strategy=strategy, top_k=1, guidance_mode=mode, route_every=route_every
        )
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            r = evaluate(ens, **(context | {"seed": seed, "out_dir": tmp}))
        n = args.num_samples
        row = {
            "guidance_mode": mode,
            "strategy": "top-1" if strategy == "top-k" else strategy,
            "route_every": route_every,
            "seed": seed,
            "fd": r.fd,
            "kid": r.kid_mean,
            "class_accuracy": r.class_accuracy,
            "expert_rows_per_sample": ens.calls.total_rows / n,
            "router_rows_per_sample": ens.calls.router_rows / n,
            "router_calls": ens.calls.router,
            "ms_per_image": 1000 * r.seconds_per_image,
            "eval_seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        acc = "-" if r.class_accuracy is None else f"{r.class_accuracy:.3f}"
        print(f"{mode:9s} {row['strategy']:9s} {route_every:5d} {seed:4d} {r.fd:8.3f} {r.kid_mean:9.5f} {acc:>6s} "
              f"{row['expert_rows_per_sample']:11.1f} {row['router_rows_per_sample']:11.1f} "
              f"{row['ms_per_image']:7.1f}", flush=True)  # fmt: skip
    out["fd_noise_floor"] = abs(rows[0]["fd"] - rows[1]["fd"]) if rows[1]["seed"] == 1 else None
    out["rows"] = [{k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()} for row in rows]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
