"""Pinned numerics of sampling: every sampler on a few time grids, every ensemble strategy, guided and
unguided, and the distilled student (with and without the step-size input), at fixed seeds on CPU fp32.

The networks are tiny random DiTs and a random router (every weight perturbed, so nothing is zero); what
is pinned is a SHA-256 of each run's final sample, of every step's x0 prediction, the grid it visited
and the calls it made (tests/test_sampling_numerics.py compares against tests/data/sampling_numerics.json),
so a refactor of the samplers, the ensemble or the student is proven numerics-identical bit for bit.

    python tests/sampling_numerics.py            # print the current figures as JSON
    python tests/sampling_numerics.py --write    # re-pin (only for a change that is *meant* to move numerics)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from numerics import pin_main

HERE = Path(__file__).resolve().parent
PINNED = HERE / "data" / "sampling_numerics.json"

IMAGE = dict(image_size=8, in_channels=1, num_classes=3)
SAMPLERS = ("euler", "heun", "stochastic")
GRIDS = ((4, 1.0), (3, 3.0))  # (steps, time_shift)
N = 4


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight moved off its initial value (a fresh DiT outputs exactly zero: adaLN-Zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def _dit(seed: int, **flags: bool) -> torch.nn.Module:
    from ddm.expert.model import DiT, DiTConfig

    torch.manual_seed(seed)
    return _perturbed(
        DiT(DiTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2, **IMAGE, **flags)), seed
    )


def _router(seed: int) -> torch.nn.Module:
    from ddm.router.model import RouterConfig, RouterNet

    torch.manual_seed(seed)
    cfg = RouterConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2, num_experts=3, **IMAGE)
    return _perturbed(RouterNet(cfg), seed)


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu().reshape(-1)
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run(
    denoiser: Any, *, steps: int, sampler: str, time_shift: float, churn: float = 0.5, seed: int = 0
) -> dict:
    from ddm.expert.sampling import sample

    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(N, IMAGE["in_channels"], IMAGE["image_size"], IMAGE["image_size"], generator=gen)
    y = torch.tensor([0, 1, 2, 3])  # 3 = the null label
    seen: list = []
    x = sample(denoiser, noise, y, steps=steps, sampler=sampler, time_shift=time_shift, churn=churn,
               generator=gen, callback=seen.append)  # fmt: skip
    return {
        "x": _digest(x),
        "x0_pred": _digest(*(s.x0_pred for s in seen)),
        "grid": [float(s.t).hex() for s in seen] + [float(seen[-1].t_next).hex()],
    }


def run_all() -> dict[str, Any]:
    from ddm.expert.denoiser import ModuleDenoiser
    from ddm.expert.guidance import with_guidance
    from ddm.expert.student import StudentDenoiser
    from ddm.router.ensemble import Ensemble

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    expert = ModuleDenoiser(_dit(1), num_classes=3)
    for sampler in SAMPLERS:
        for steps, shift in GRIDS:
            for scale in (0.0, 1.0, 3.0):
                out[f"expert/{sampler}/{steps}x{shift}/w{scale}"] = _run(
                    with_guidance(expert, scale), steps=steps, sampler=sampler, time_shift=shift
                )
    out["expert/stochastic/4x1.0/w3.0/churn1"] = _run(
        with_guidance(expert, 3.0), steps=4, sampler="stochastic", time_shift=1.0, churn=1.0
    )

    experts = [ModuleDenoiser(_dit(10 + k), num_classes=3) for k in range(3)]
    router = _router(20)
    partition = torch.tensor([2, 0, 1, 0])
    strategies = {
        "full": {},
        "top-1": dict(top_k=1),
        "top-2": dict(top_k=2),
        "threshold": dict(threshold=0.3),
    }
    for name, kw in [*strategies.items(), ("oracle", {})]:
        strategy = "top-k" if name.startswith("top-") else name
        for sampler in SAMPLERS:
            for steps, shift in GRIDS[:1] if sampler != "euler" else GRIDS:
                for scale in (1.0, 3.0):
                    # pinned before guidance modes existed: the per-expert rule, which must not move
                    ens = Ensemble(experts, None if name == "oracle" else router, strategy=strategy,
                                   guidance_mode="expert", **kw)  # fmt: skip
                    den = ens.with_partition(partition) if name == "oracle" else ens
                    run = _run(with_guidance(den, scale), steps=steps, sampler=sampler, time_shift=shift)
                    run["calls"] = [list(ens.calls.rows), list(ens.calls.batches), ens.calls.router]
                    out[f"ensemble/{name}/{sampler}/{steps}x{shift}/w{scale}"] = run
        if name != "oracle":  # ensemble-level guidance (guidance_mode "ensemble"), euler
            ens = Ensemble(experts, router, strategy=strategy, guidance_mode="ensemble", **kw)
            run = _run(with_guidance(ens, 3.0), steps=GRIDS[0][0], sampler="euler", time_shift=GRIDS[0][1])
            run["calls"] = [
                list(ens.calls.rows),
                list(ens.calls.batches),
                ens.calls.router,
                ens.calls.router_rows,
            ]
            out[f"ensemble-mode/{name}/euler/{GRIDS[0][0]}x{GRIDS[0][1]}/w3.0"] = run

    for kind, flags in (("shortcut", dict(step_embed=True)), ("flow", {})):
        student = StudentDenoiser(_dit(30, guidance_embed=True, **flags))
        for sampler in SAMPLERS:
            for steps, shift in GRIDS:
                for scale in (1.0, 3.0):
                    view = student.with_counter()
                    run = _run(with_guidance(view, scale), steps=steps, sampler=sampler, time_shift=shift)
                    run["calls"] = [view.calls.total_rows, view.calls.total_batches]
                    out[f"student/{kind}/{sampler}/{steps}x{shift}/w{scale}"] = run
    return out


def main(argv: list[str] | None = None) -> int:
    return pin_main(__doc__, PINNED, run_all, argv)


if __name__ == "__main__":
    raise SystemExit(main())
