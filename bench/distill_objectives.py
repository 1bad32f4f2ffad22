"""The few-step objectives side by side on a closed form: Gaussian data, the analytic velocity as teacher.

    python bench/distill_objectives.py            # 800 training steps per objective
    python bench/distill_objectives.py --quick    # 300

Each objective of ``ddm.router.distill_objectives.OBJECTIVES`` trains the same small MLP student
s(x_t, t, d) from the same seed with the trainer's row split (75% flow rows regressing the teacher
velocity, 25% jump rows on the objective's own (t, d) and target, ``min_step`` 1/8), the teacher being
the exact velocity of N(mu, Sigma) in 4 dimensions (``ddm.expert.analytic.GaussianDenoiser``). Then
the student samples 2,000 noises in 1, 2 and 4 Euler steps through ``StudentDenoiser`` (d = the step),
and the figure is the RMS distance to where the exact probability-flow ODE takes the same noise (a
200-step Heun solve): 0 for a perfect few-step student. The row ``exact velocity`` is Euler on the
true flow with the same steps, what a student without the step size could reach at best. Last line one
JSON object: {"rms_1step": {OBJECTIVE: ...}, "rms_2step": ..., "rms_4step": ..., "seconds": {...}}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from ddm.expert import flow
from ddm.expert.analytic import GaussianDenoiser
from ddm.expert.model import DiTConfig
from ddm.expert.sampling import sample
from ddm.expert.student import StudentDenoiser
from ddm.router.distill_config import ShortcutConfig
from ddm.router.distill_objectives import OBJECTIVES

STEPS = (1, 2, 4)


class MLPStudent(nn.Module):
    """s(x_t, t, d) for (1, 2, 2) data with the student's call signature (y and w ignored: one class)."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 4))  # fmt: skip
        self.config = DiTConfig(image_size=2, in_channels=1, patch_size=1, hidden_size=4, depth=1, num_heads=1,
                                num_classes=1, guidance_embed=True, step_embed=True)  # fmt: skip

    def forward(self, x_t, t, y, w=None, d=None):
        n = x_t.shape[0]
        d = torch.zeros_like(t) if d is None else d
        z = torch.cat([x_t.reshape(n, -1), t.reshape(n, 1).to(x_t.dtype), d.reshape(n, 1).to(x_t.dtype)], 1)
        return self.net(z).reshape(x_t.shape)  # (N, 1, 2, 2)


def gaussian() -> GaussianDenoiser:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.T / 4 + 0.05 * torch.eye(4, dtype=torch.float64)
    return GaussianDenoiser(torch.tensor([0.5, -1.0, 0.25, 2.0]).reshape(1, 2, 2), cov)


def train_student(gauss: GaussianDenoiser, objective: str, steps: int, *, batch: int = 256, lr: float = 3e-3,
                  fraction: float = 0.25, seed: int = 0, meanflow_times: str = "grid") -> MLPStudent:  # fmt: skip
    """The MLP trained ``steps`` Adam steps on ``objective`` from the analytic teacher."""
    torch.manual_seed(seed)
    net = MLPStudent()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    cfg = ShortcutConfig(
        objective=objective, min_step=1 / 8, fraction=fraction, meanflow_times=meanflow_times
    )
    entry = OBJECTIVES.entry(objective)
    gen = torch.Generator().manual_seed(seed + 1)
    n_b = round(batch * fraction)
    f, b = slice(0, batch - n_b), slice(batch - n_b, None)
    y, w = torch.zeros(batch, dtype=torch.long), torch.ones(batch)

    def student(x, t, y_, w_, d):
        return net(x, t, y_, w_, d)

    for _ in range(steps):
        x_0 = gauss.sample_x0(batch, gen).float()  # (B, 1, 2, 2)
        eps = torch.randn(x_0.shape, generator=gen)
        t_b, d_b = entry.value.times(n_b, cfg, gen)  # (B_b,) each
        t = torch.cat([torch.rand(batch - n_b, generator=gen), t_b])  # (B,)
        d = torch.cat([torch.zeros(batch - n_b), d_b])  # (B,)
        x_t = flow.interpolate(x_0, eps, t)
        v = gauss.velocity(x_t.double(), t.double()).float()  # the teacher (B, 1, 2, 2)
        jump = entry.value.target(
            student, x_t[b], t[b], y[b], w[b], d[b], v[b] if entry.teacher else None, cfg
        )
        loss = torch.mean((net(x_t, t, y, w, d) - torch.cat([v[f], jump])) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def rms_to_ode(denoiser, noise: torch.Tensor, reference: torch.Tensor, steps: int) -> float:
    y = torch.zeros(noise.shape[0], dtype=torch.long)
    x = sample(denoiser, noise, y, steps=steps).double()
    return round(((x - reference) ** 2).flatten(1).sum(1).mean().sqrt().item(), 4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 training steps per objective (default 800)")
    p.add_argument("--steps", type=int, help="training steps per objective")
    p.add_argument("--objectives", default=",".join(OBJECTIVES.names()), help="comma-separated objectives")
    p.add_argument(
        "--meanflow-times", default="grid", choices=("grid", "uniform"), help="shortcut.meanflow_times"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (300 if args.quick else 800)
    gauss = gaussian()
    noise = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = sample(gauss, noise, torch.zeros(2000, dtype=torch.long), steps=200, sampler="heun")
    out: dict[str, dict[str, float]] = {f"rms_{k}step": {} for k in STEPS}
    out["seconds"] = {}
    for k in STEPS:
        out[f"rms_{k}step"]["exact velocity"] = rms_to_ode(gauss, noise, reference, k)
    for name in args.objectives.split(","):
        started = time.perf_counter()
        net = train_student(gauss, name, steps, meanflow_times=args.meanflow_times)
        out["seconds"][name] = round(time.perf_counter() - started, 1)
        with torch.no_grad():
            for k in STEPS:
                out[f"rms_{k}step"][name] = rms_to_ode(StudentDenoiser(net), noise.float(), reference, k)
    print("| model | " + " | ".join(f"{k} step(s)" for k in STEPS) + " |")
    print("|---|" + "---|" * len(STEPS))
    for name in out["rms_1step"]:
        print(f"| {name} | " + " | ".join(f"{out[f'rms_{k}step'][name]:.4f}" for k in STEPS) + " |")
    print(json.dumps({**out, "train_steps": steps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
