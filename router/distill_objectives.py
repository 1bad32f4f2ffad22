"""Few-step distillation objectives: what a student's step-size rows learn (``shortcut.objective``).

A few-step student s(x_t, t, d) takes the step size d as an input and samples with the jump
x_{t-d} = x_t - d s(x_t, t, d) (``ddm.expert.student.StudentDenoiser.step_velocity``: Euler asks for the
step t -> t_next, d = t - t_next; one network pass per step). Rows with d = 0 regress the guided teacher
(the flow); the other rows (``shortcut.fraction`` of each batch) learn the jump, and an objective says
how. Both below train the *same* network and the *same* sampler, so students of either objective are
served, evaluated and benchmarked the same way:

* ``shortcut`` (Frans, Hafner, Levine, Abbeel 2024, "One Step Diffusion via Shortcut Models", eq. 5 in
  our time direction): self-consistency, one step of size 2h equals two of size h,
  s(x_t, t, 2h) <- (s(x_t, t, h) + s(x_t - h s(x_t, t, h), t - h, h)) / 2 (stop-gradient), for
  2h in {1, 1/2, ..., min_step} and t on the grid of multiples of 2h; half steps below ``min_step`` use
  d = 0. No teacher pass: two no-grad student passes per row.
* ``meanflow`` (Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling", eq. 6
  and 9): s is the *average velocity* u(x_t, r, t) = 1/(t - r) int_r^t v(x_tau, tau) dtau with r = t - d,
  so x_r = x_t - (t - r) u exactly. Differentiating (t - r) u = int_r^t v dtau in t gives the MeanFlow
  identity u = v - (t - r) du/dt, with the total derivative du/dt = v . d_x u + d_t u along the flow. The
  target is v - d (du/dt) (stop-gradient), where v is the guided teacher's velocity at (x_t, t) and
  du/dt is one forward-mode product ``torch.func.jvp`` of the student with tangents (v, 1, 1) in
  (x_t, t, d) (d = t - r moves with t at fixed r). Trained from the teacher: one teacher pass (the
  guided pair) and one jvp (about 3 forward passes on CPU) per row.

Each entry declares ``teacher``: whether its target needs the teacher's velocity on its rows. Its value
is an ``Objective``: ``times(n, shortcut_cfg, generator) -> (t, d)`` and
``target(student, x_t, t, y, w, d, v, shortcut_cfg) -> (N, C, H, W)`` with ``student(x, t, y, w, d)``
the network and ``v`` the teacher velocity (None when ``teacher`` is false).

This module imports no torch at module level (the registry feeds the CLI's choices; see
``ddm.core.registry``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ddm.core.registry import Registry

if TYPE_CHECKING:
    import torch

    from ddm.router.distill_config import ShortcutConfig


@dataclass(frozen=True)
class Objective:
    times: Callable[..., tuple[Any, Any]]  # (n, ShortcutConfig, torch.Generator) -> (t, d), (n,) float32
    target: Callable[..., Any]  # (student, x_t, t, y, w, d, v, ShortcutConfig) -> (N, C, H, W)


OBJECTIVES: Registry[Objective] = Registry("distillation objective", required=("teacher",))


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) in like's dtype."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


# ----------------------------------------------------------------------------------------------------
# Shortcut models.


def shortcut_times(
    n: int, shortcut: ShortcutConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, D) for n rows: D = 2^-j with j uniform in {0, ..., levels}, and t uniform on the grid
    {D, 2D, ..., 1} that an N = 1/D step Euler sampler visits. Both (n,) float32."""
    import torch

    level = torch.randint(0, shortcut.levels + 1, (n,), generator=generator)  # (n,)
    size = torch.pow(2.0, -level.float())  # (n,) D
    steps = torch.pow(2.0, level.float())  # (n,) 1/D
    j = torch.floor(torch.rand(n, generator=generator) * steps) + 1  # (n,) in {1, ..., 1/D}
    return (j * size).clamp(max=1.0), size


def shortcut_target(
    student: Callable[..., torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    size: torch.Tensor,
    min_step: float,
) -> torch.Tensor:
    """Self-consistency target for s(x_t, t, D): the mean of two half steps h = D / 2 (no gradient).

    ``student(x, t, y, w, d)`` is the network; half steps below ``min_step`` are evaluated at d = 0.
    Shapes: x_t (N, C, H, W); t, w, size (N,); y (N,) -> (N, C, H, W).
    """
    import torch

    with torch.no_grad():
        h = size / 2  # (N,)
        d_in = torch.where(h >= min_step - 1e-12, h, torch.zeros_like(h))  # (N,)
        s_1 = student(x_t, t, y, w, d_in)  # (N, C, H, W)
        x_mid = x_t - _col(h, x_t) * s_1  # one Euler step of size h towards t = 0
        s_2 = student(x_mid, t - h, y, w, d_in)  # (N, C, H, W)
        return (s_1 + s_2) / 2


OBJECTIVES.add(
    "shortcut",
    Objective(
        times=shortcut_times,
        target=lambda student, x_t, t, y, w, d, v, cfg: shortcut_target(
            student, x_t, t, y, w, d, cfg.min_step
        ),
    ),
    help="shortcut models (Frans et al. 2024): one step of 2h = two of h, bootstrapped from the student",
    teacher=False,
)


# ----------------------------------------------------------------------------------------------------
# MeanFlow.


def meanflow_times(
    n: int, shortcut: ShortcutConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, d = t - r) for n rows, by ``shortcut.meanflow_times``: 'grid' is the shortcut grid (the steps a
    1..1/min_step step Euler sampler takes, the same draws as ``shortcut_times``); 'uniform' is (t, r)
    the sorted pair of two U[0, 1] draws (Geng et al. sample such pairs from a logit-normal)."""
    import torch

    if shortcut.meanflow_times == "grid":
        return shortcut_times(n, shortcut, generator)
    a, b = torch.rand(n, generator=generator), torch.rand(n, generator=generator)  # (n,) each
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    return t, t - r


def meanflow_target(
    student: Callable[..., torch.Tensor],
    x_t: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    d: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """The MeanFlow target u_tgt = v - d du/dt for u(x_t, r, t) = student(x_t, t, y, w, d), d = t - r
    (no gradient). du/dt = v . d_x u + d_t u + d_d u: one jvp with tangents (v, 1, 1) in (x_t, t, d).

    Attention runs through the math SDPA kernel here: the fused CPU kernel has no forward-mode
    derivative (torch 2.x), the math one is made of differentiable ops. Shapes: x_t, v (N, C, H, W);
    t, w, d (N,); y (N,) -> (N, C, H, W).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def u(x: torch.Tensor, t_: torch.Tensor, d_: torch.Tensor) -> torch.Tensor:
        return student(x, t_, y, w, d_)

    ones = torch.ones_like(t)  # (N,)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, du_dt = torch.func.jvp(u, (x_t, t, d), (v.to(x_t.dtype), ones, ones))  # (N, C, H, W)
    return v.to(du_dt.dtype) - _col(d, du_dt) * du_dt


OBJECTIVES.add(
    "meanflow",
    Objective(
        times=meanflow_times,
        target=lambda student, x_t, t, y, w, d, v, cfg: meanflow_target(student, x_t, t, y, w, d, v),
    ),
    help="MeanFlow (Geng et al. 2025): the average velocity u = v - (t - r) du/dt from the teacher's v, du/dt by jvp",
    teacher=True,
)
