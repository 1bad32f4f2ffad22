"""Guidance modes and routing options on data where the answer is known: a class-conditional, partitioned
Gaussian mixture (``ddm.expert.analytic.ClassConditionalMixture``) with its exact experts.

    python bench/guidance_analytic.py [--quick] [--n 2000] [--steps 16] [--guidance 3]

K = 4 partitions of C = 10 classes in D = 16 dimensions, each class spread unevenly over the partitions
(as clustering spreads them). The target is the guided monolith's ODE (Euler, the same noise): every
setting is scored against it by the per-sample RMS distance of the final samples, the Fréchet distance
between the sample sets (data space), and class accuracy under the data's Bayes classifier p(c | x_0);
cost is expert rows and router rows per sample (a guided pass counts 2 rows). Two routers: the exact
posterior, and a "learned-like" one (the exact logits tempered by 0.5 and perturbed by fixed noise of
std 1, so it is under-confident and sometimes wrong, as a trained router is).

Prints a table, then one JSON object as the LAST line.
"""

from __future__ import annotations

import argparse
import json

import torch

from ddm.expert.analytic import ClassConditionalMixture
from ddm.expert.guidance import guided
from ddm.expert.metrics import frechet_distance
from ddm.expert.sampling import sample
from ddm.router.ensemble import Ensemble

K, C, D = 4, 10, 16


def make_data(seed: int = 0) -> ClassConditionalMixture:
    g = torch.Generator().manual_seed(seed)
    # class c lives mostly in partition c % K, partly in one other, a little everywhere
    w = torch.full((K, C), 0.02, dtype=torch.float64)
    for c in range(C):
        w[c % K, c] = 1.0
        w[(c + 1 + c // K) % K, c] += 0.4
    means = 2.5 * torch.randn(K, C, 1, 4, 4, generator=g, dtype=torch.float64)
    a = torch.randn(K, C, D, D, generator=g, dtype=torch.float64)
    covs = 0.5 * a @ a.transpose(-1, -2) / D + 0.05 * torch.eye(D, dtype=torch.float64)
    return ClassConditionalMixture(w, means, covs)


class LearnedLikeRouter:
    """softmax(0.5 * log p_exact + noise): fixed noise per (row position, expert), deterministic."""

    def __init__(self, data: ClassConditionalMixture, seed: int = 1) -> None:
        self.data, self.seed = data, seed

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logp = self.data.router(x_t, t, y).clamp_min(1e-300).log()  # (N, K)
        g = torch.Generator().manual_seed(self.seed + int(1000 * float(t[0])))
        noise = torch.randn(logp.shape, generator=g, dtype=logp.dtype)
        return torch.softmax(0.5 * logp + noise, dim=1)


class Monolith:
    def __init__(self, data: ClassConditionalMixture, scale: float) -> None:
        self.data, self.scale, self.num_classes = data, scale, data.num_classes

    def velocity(self, x_t, t, y):
        null = torch.full_like(y, self.data.null_label)
        return guided(self.data.velocity(x_t, t, y), self.data.velocity(x_t, t, null), self.scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 samples, fewer settings")
    parser.add_argument("--n", type=int, default=2000, help="samples per setting (default 2000)")
    parser.add_argument("--steps", type=int, default=16, help="Euler steps (default 16)")
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance scale (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared machine
    n = 500 if args.quick else args.n
    data = make_data()
    noise = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.arange(n) % C
    target = sample(Monolith(data, args.guidance), noise, y, steps=args.steps)  # (n, 1, 4, 4)
    flat_target = target.flatten(1).numpy()

    def score(x: torch.Tensor) -> dict[str, float]:
        acc = (data.class_posterior(x, torch.zeros(n, dtype=x.dtype)).argmax(1) == y).double().mean()
        return {
            "rmse_to_monolith": float((x - target).flatten(1).pow(2).sum(1).mean().sqrt()),
            "fd_to_monolith": float(frechet_distance(x.flatten(1).numpy(), flat_target)),
            "class_accuracy": float(acc),
        }

    out: dict[str, object] = {"K": K, "C": C, "D": D, "n": n, "steps": args.steps, "guidance": args.guidance,
                              "monolith": score(target)}  # fmt: skip
    # a second draw of the monolith itself from other noise: how big an FD is noise at this n
    other = sample(Monolith(data, args.guidance), torch.randn(noise.shape, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64), y, steps=args.steps)  # fmt: skip
    out["fd_noise_floor"] = float(frechet_distance(other.flatten(1).numpy(), flat_target))
    print(f"guided monolith: class accuracy {out['monolith']['class_accuracy']:.3f}; "
          f"FD of a second monolith draw (noise floor at n={n}): {out['fd_noise_floor']:.4f}")  # fmt: skip
    everies = (1, 4) if args.quick else (1, 2, 4, 8)
    rows = []
    print(f"{'router':8s} {'mode':9s} {'strategy':8s} {'route':>5s} {'RMSE':>8s} {'FD':>8s} {'acc':>6s} "
          f"{'exp rows':>8s} {'rtr rows':>8s}")  # fmt: skip
    for router_name in ("exact", "learned"):
        router = data.router if router_name == "exact" else LearnedLikeRouter(data)
        for mode in ("ensemble", "expert"):
            for strategy, every in [("full", 1)] + [("top-k", e) for e in everies]:
                ens = Ensemble([data.expert(k) for k in range(K)], router, strategy=strategy, guidance_mode=mode,
                               route_every=every)  # fmt: skip
                x = sample(ens.guided(args.guidance), noise, y, steps=args.steps)
                row = {"router": router_name, "guidance_mode": mode, "strategy": "top-1" if strategy == "top-k"
                       else strategy, "route_every": every, **score(x),
                       "expert_rows_per_sample": ens.calls.total_rows / n,
                       "router_rows_per_sample": ens.calls.router_rows / n}  # fmt: skip
                rows.append(row)
                print(f"{router_name:8s} {mode:9s} {row['strategy']:8s} {every:5d} {row['rmse_to_monolith']:8.4f} "
                      f"{row['fd_to_monolith']:8.4f} {row['class_accuracy']:6.3f} "
                      f"{row['expert_rows_per_sample']:8.1f} {row['router_rows_per_sample']:8.1f}", flush=True)  # fmt: skip
    out["rows"] = [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
