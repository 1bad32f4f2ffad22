"""The samplers and time grids: two registries, each filled here and nowhere else (k-diffusion style).

Every sampler is one generator function with one signature,

    sampler(model, x, ts, *, noise, churn) -> Iterator[Step]

``model(x, t, t_next=None) -> v`` is the denoiser at a shared time ``t`` (``ddm.expert.sampling`` builds
it from any Denoiser and the labels); a sampler that integrates the step to ``t_next`` with that one
velocity passes ``t_next``, so a shortcut student can take the whole step (its step size is an input),
while a sampler that wants the instantaneous velocity leaves it out. ``x`` (N, C, H, W) is the state at
``ts[0] = 1``; ``ts`` the decreasing time grid, 1 -> 0 (the time grid is an argument, like k-diffusion's
``sigmas``); ``noise(x)`` draws fresh N(0, I) like x; ``churn`` is the stochastic sampler's setting
(deterministic samplers ignore both). A sampler yields one :class:`Step` per step.

Every time grid is a function ``grid(steps, time_shift) -> [t_0 = 1, ..., t_steps = 0]``.

Convention (ddm.expert.flow): x_t = (1 - t) x_0 + t eps, v = eps - x_0; samplers integrate dx/dt = v
from t = 1 (noise) to t = 0 (data).

This module imports no torch (tensor methods only), so the CLI reads the registries' names for its
``choices`` without loading it. To add a sampler: one decorated function here, one test (copy
``test_a_registered_sampler_is_everywhere`` in tests/test_registries.py). To add a time grid: the same,
one decorated function here (``SampleConfig.time_grid``, ``--time-grid``, ``SampleRequest.time_grid`` and
``RouterInfo.time_grids`` read the registry), one test (copy ``test_a_registered_time_grid_is_what_the_sampler_visits``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ddm.core.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Step:
    """Progress of one sampler step, from ``t`` down to ``t_next``.

    ``x`` is the state *after* the step (at ``t_next``), so the last Step's ``x`` is the sample.
    ``x0_pred`` is the data prediction x_t - t v(x_t, t) from the step's first denoiser call (at ``t``).
    """

    index: int  # 0-based step number
    total: int  # number of steps
    t: float
    t_next: float
    x: Tensor  # (N, C, H, W) state at t_next
    x0_pred: Tensor  # (N, C, H, W) prediction of x_0 made at t


class Model(Protocol):
    """The denoiser as a sampler sees it: v (N, C, H, W) at x (N, C, H, W) and a shared time t; with
    ``t_next``, the velocity over the step to t_next (a shortcut model's, else the same instantaneous v)."""

    def __call__(self, x: Tensor, t: float, t_next: float | None = None) -> Tensor: ...


NoiseSampler = Callable[["Tensor"], "Tensor"]
Sampler = Callable[..., Iterator[Step]]
TimeGrid = Callable[[int, float], list[float]]

SAMPLERS: Registry[Sampler] = Registry("sampler", required=("calls", "stochastic"))
"""Attributes: ``calls(steps) -> int`` denoiser calls per run; ``stochastic``: draws fresh noise per
step (so requests cannot be batched into one cohort without changing their numbers)."""

TIME_GRIDS: Registry[TimeGrid] = Registry("time grid")


# ------------------------------------------------------------------------------------------ samplers


@SAMPLERS.register(
    "euler",
    help="first-order Euler (the DDIM update in rectified-flow form)",
    calls=lambda steps: steps,
    stochastic=False,
)
def euler(
    model: Model, x: Tensor, ts: Sequence[float], *, noise: NoiseSampler, churn: float
) -> Iterator[Step]:
    """x <- x + (t_next - t) v(x, t). One call per step; the step to t_next is asked for as one step."""
    steps = len(ts) - 1
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = model(x, t, t_next)  # (N, C, H, W)
        x0_pred = x - t * v
        x = x + (t_next - t) * v  # never in place: yielded Steps keep their tensors
        yield Step(index=i, total=steps, t=t, t_next=t_next, x=x, x0_pred=x0_pred)


@SAMPLERS.register(
    "heun",
    help="Heun's 2nd-order method (Karras et al. 2022, Alg. 1), the last step Euler",
    calls=lambda steps: 2 * steps - 1,
    stochastic=False,
)
def heun(
    model: Model, x: Tensor, ts: Sequence[float], *, noise: NoiseSampler, churn: float
) -> Iterator[Step]:
    """Heun's method on the instantaneous velocity; the last step, to t = 0, is a plain Euler step as in
    Karras et al. 2 calls per step, 1 on the last."""
    steps = len(ts) - 1
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t  # negative
        v = model(x, t)  # (N, C, H, W)
        x0_pred = x - t * v
        x_euler = x + dt * v
        if t_next == 0:  # Karras et al.: the step to t = 0 stays first order
            x = x_euler
        else:
            v_next = model(x_euler, t_next)
            x = x + dt * 0.5 * (v + v_next)
        yield Step(index=i, total=steps, t=t, t_next=t_next, x=x, x0_pred=x0_pred)


@SAMPLERS.register(
    "stochastic",
    help="DDIM-eta renoising (Song et al. 2021, eq. 12): churn 0 = Euler, 1 = DDPM ancestral",
    calls=lambda steps: steps,
    stochastic=True,
)
def stochastic(
    model: Model, x: Tensor, ts: Sequence[float], *, noise: NoiseSampler, churn: float
) -> Iterator[Step]:
    """One call per step on the instantaneous velocity, then :func:`stochastic_update` with fresh noise."""
    steps = len(ts) - 1
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = model(x, t)  # (N, C, H, W)
        x0_pred = x - t * v
        x = stochastic_update(x, v, t, t_next, churn, noise(x))
        yield Step(index=i, total=steps, t=t, t_next=t_next, x=x, x0_pred=x0_pred)


def ancestral_fraction(t: float, t_next: float) -> float:
    """Fraction of the noise at t_next that the DDPM ancestral step renews (DDIM eta = 1).

    In rectified-flow form (signal 1 - t, noise t) the posterior q(x_t' | x_t, x_0) has standard
    deviation t' * rho with rho^2 = 1 - ((1 - t) t' / ((1 - t') t))^2 (Song et al. 2021, eq. 16).
    rho = 1 when leaving pure noise (t = 1) and rho ~ sqrt(2 dt / (t (1 - t))) for small steps.
    """
    if not 0 <= t_next < t <= 1:
        raise ValueError(f"need 0 <= t_next < t <= 1, got t={t}, t_next={t_next}")
    if t_next == 0:
        return 0.0  # the noise term is multiplied by t_next = 0 anyway
    q = (1 - t) * t_next / ((1 - t_next) * t)
    return math.sqrt(max(0.0, 1 - q * q))


def stochastic_update(x: Tensor, v: Tensor, t: float, t_next: float, churn: float, fresh: Tensor) -> Tensor:
    """One stochastic step from t to t_next given the velocity v = v(x, t) and fresh N(0, I) noise.

    Predict x0_hat = x - t v and eps_hat = x + (1 - t) v, then

        x_next = (1 - t_next) x0_hat + t_next (sqrt(1 - rho^2) eps_hat + rho fresh),
        rho    = churn * ancestral_fraction(t, t_next).

    churn = 0 is exactly the deterministic Euler / DDIM update x + (t_next - t) v (the eps_hat and x0_hat
    terms recombine to it); churn = 1 is DDPM ancestral sampling; in between is DDIM with eta = churn.

    Why rho scales with the ancestral fraction rather than being ``churn`` itself: renewing a fixed
    fraction of the noise on every step does not vanish as steps -> infinity, and because x0_hat is a
    posterior *mean* each renewal loses variance. Measured with the exact Gaussian denoiser (1-D, any
    data variance), a fixed fraction 0.5 converges to ~93% of the data variance however many steps are
    used, while this form converges to 100% like Euler does.
    """
    x0_hat = x - t * v  # (N, C, H, W), flow.predict_x0 with a scalar t
    eps_hat = x + (1 - t) * v  # (N, C, H, W), flow.predict_eps with a scalar t
    rho = churn * ancestral_fraction(t, t_next)
    return (1 - t_next) * x0_hat + t_next * (math.sqrt(1 - rho * rho) * eps_hat + rho * fresh)


# ---------------------------------------------------------------------------------------- time grids


@TIME_GRIDS.register(
    "uniform",
    help="uniform in t, then the resolution shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23)",
)
def uniform(steps: int, time_shift: float) -> list[float]:
    from ddm.expert import flow  # torch, only when a grid is made

    return flow.time_grid(steps, time_shift).tolist()


def make_grid(name: str, steps: int, time_shift: float) -> list[float]:
    """The grid ``name`` for ``steps`` steps, checked: steps + 1 decreasing times from 1 to 0."""
    ts = [float(t) for t in TIME_GRIDS.get(name, field="time_grid")(steps, time_shift)]
    if len(ts) != steps + 1 or ts[0] != 1 or ts[-1] != 0 or any(a <= b for a, b in itertools.pairwise(ts)):
        raise ValueError(
            f"time grid {name!r} returned {len(ts)} times for {steps} steps; a grid must give steps + 1 "
            "strictly decreasing times from 1 to 0"
        )
    return ts
