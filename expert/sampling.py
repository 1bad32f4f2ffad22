"""Samplers over the one Denoiser interface (k-diffusion style).

Every sampler takes ``(denoiser, noise, y, *, steps, time_shift, callback, ...)`` and works on anything
that implements :class:`ddm.expert.denoiser.Denoiser`: one expert, the router's ensemble, a distilled
student, a guidance wrapper. Samplers never know what is behind ``velocity``; guidance and call counting
are wrappers (``ddm.expert.guidance.CFGDenoiser``, :class:`CountingDenoiser`).

Convention (ddm.expert.flow): x_t = (1 - t) x_0 + t eps, v = eps - x_0; sampling integrates
dx/dt = v from t = 1 (noise) to t = 0 (data) over ``flow.time_grid(steps, time_shift)``.

* ``euler``      x <- x + (t_next - t) v(x, t).                         1 call per step.
* ``heun``       Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step, to t = 0, is a
                 plain Euler step as in Karras et al.                   2 calls per step, 1 on the last.
* ``stochastic`` DDIM-style renoising (Song et al. 2021, eq. 12, in rectified-flow form), see
                 :func:`stochastic_update`.                              1 call per step.

The progressive form :func:`iter_sample` yields a :class:`Step` per step; ``callback`` receives the same
object. Both only hold references to tensors the sampler already made, so a callback is cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ddm.expert import flow
from ddm.expert.denoiser import Denoiser

SAMPLERS: tuple[str, ...] = ("euler", "heun", "stochastic")


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
    x: torch.Tensor  # (N, C, H, W) state at t_next
    x0_pred: torch.Tensor  # (N, C, H, W) prediction of x_0 made at t


Callback = Callable[[Step], None]


class CountingDenoiser:
    """Wraps a denoiser and counts its calls (``calls``) and the rows it evaluated (``rows``).

    Used to report "expert calls per sample": wrap each expert (or the whole ensemble), sample, read.
    A CFG pass through a wrapped inner denoiser is one call with 2N rows.
    """

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.num_classes = inner.num_classes
        self.calls = 0
        self.rows = 0

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        return self.inner.velocity(x_t, t, y)


def _check_inputs(denoiser: Denoiser, noise: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """Raise ValueError for anything a caller can get wrong, before any denoiser call."""
    if not isinstance(denoiser, Denoiser):
        raise ValueError(
            f"denoiser {type(denoiser).__name__} does not implement the Denoiser interface "
            "(needs a `num_classes` attribute and `velocity(x_t, t, y)`); wrap an nn.Module in ModuleDenoiser"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(noise, torch.Tensor) or noise.ndim != 4:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a tensor of shape (N, C, H, W), got {shape}")
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    if not isinstance(y, torch.Tensor) or y.shape != (noise.shape[0],):
        shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(
            f"y must be a tensor of shape (N,) = ({noise.shape[0]},) matching noise, got {shape}"
        )
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"y must hold integer class labels (torch.long), got dtype {y.dtype}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > denoiser.num_classes):
        raise ValueError(
            f"labels must lie in [0, {denoiser.num_classes}] (num_classes is the null label), "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )


def _velocity(denoiser: Denoiser, x: torch.Tensor, t: float, y: torch.Tensor) -> torch.Tensor:
    """One denoiser call at a shared time t; checks the output shape (a wrong model fails loudly here)."""
    t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (N,)
    v = denoiser.velocity(x, t_vec, y)  # (N, C, H, W)
    if v.shape != x.shape:
        raise ValueError(
            f"{type(denoiser).__name__}.velocity returned shape {tuple(v.shape)} for input {tuple(x.shape)}; "
            "a denoiser must return a velocity of the same shape as x_t"
        )
    return v.to(x.dtype)


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


def stochastic_update(
    x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, churn: float, fresh: torch.Tensor
) -> torch.Tensor:
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


def _fresh_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) like x, drawn on the generator's device and moved to x's: a seeded CPU generator gives
    the same noise whether the model runs on the CPU or a GPU."""
    where = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=where).to(x.device)


def iter_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    sampler: str = "euler",
    time_shift: float = 1.0,
    churn: float = 0.5,
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Progressive sampler: yields one :class:`Step` per step; the last Step's ``x`` is the sample.

    noise (N, C, H, W) is x at t = 1; y (N,) long labels (``denoiser.num_classes`` = unconditional).
    ``churn`` and ``generator`` are used by the stochastic sampler only.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not (isinstance(churn, (int, float)) and 0 <= churn <= 1):
        raise ValueError(f"churn must be a number in [0, 1], got {churn!r}")
    _check_inputs(denoiser, noise, y, steps)
    grid = flow.time_grid(steps, time_shift).tolist()  # steps + 1 floats, 1 -> 0
    return _iterate(denoiser, noise, y, grid, sampler, float(churn), generator)


@torch.no_grad()
def _iterate(
    denoiser: Denoiser,
    noise: torch.Tensor,
    y: torch.Tensor,
    grid: list[float],
    sampler: str,
    churn: float,
    generator: torch.Generator | None,
) -> Iterator[Step]:
    steps = len(grid) - 1
    x = noise  # (N, C, H, W), never modified in place: yielded Steps keep their tensors
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        dt = t_next - t  # negative
        v = _velocity(denoiser, x, t, y)  # (N, C, H, W)
        x0_pred = x - t * v
        if sampler == "euler":
            x = x + dt * v
        elif sampler == "heun":
            x_euler = x + dt * v
            if t_next == 0:  # Karras et al.: the step to t = 0 stays first order
                x = x_euler
            else:
                v_next = _velocity(denoiser, x_euler, t_next, y)
                x = x + dt * 0.5 * (v + v_next)
        else:  # stochastic
            fresh = _fresh_noise(x, generator)
            x = stochastic_update(x, v, t, t_next, churn, fresh)
        yield Step(index=i, total=steps, t=t, t_next=t_next, x=x, x0_pred=x0_pred)


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    sampler: str = "euler",
    time_shift: float = 1.0,
    churn: float = 0.5,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Integrate from noise (t = 1) to data (t = 0); returns x_0 of the same shape and dtype as noise.

    ``callback(step)`` is called after every step with the :class:`Step` (index, t, state, x0 prediction).
    """
    x = noise
    for step in iter_sample(
        denoiser,
        noise,
        y,
        steps=steps,
        sampler=sampler,
        time_shift=time_shift,
        churn=churn,
        generator=generator,
    ):
        if callback is not None:
            callback(step)
        x = step.x
    return x


def sample_euler(
    denoiser: Denoiser,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    time_shift: float = 1.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """First-order Euler sampler (the DDIM update in rectified-flow form); ``steps`` denoiser calls."""
    return sample(denoiser, noise, y, steps=steps, sampler="euler", time_shift=time_shift, callback=callback)


def sample_heun(
    denoiser: Denoiser,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    time_shift: float = 1.0,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun (2nd order, Karras et al. 2022 Alg. 1); ``2 * steps - 1`` denoiser calls."""
    return sample(denoiser, noise, y, steps=steps, sampler="heun", time_shift=time_shift, callback=callback)


def sample_stochastic(
    denoiser: Denoiser,
    noise: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    time_shift: float = 1.0,
    churn: float = 0.5,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM-eta style stochastic sampler (see :func:`stochastic_update`); ``steps`` denoiser calls."""
    return sample(
        denoiser,
        noise,
        y,
        steps=steps,
        sampler="stochastic",
        time_shift=time_shift,
        churn=churn,
        generator=generator,
        callback=callback,
    )


def denoiser_calls(sampler: str, steps: int) -> int:
    """Denoiser calls one sampling run makes: ``steps``, or ``2 * steps - 1`` for Heun."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return 2 * steps - 1 if sampler == "heun" else steps
