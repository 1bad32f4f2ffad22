"""Sampling over the one Denoiser interface (k-diffusion style): the harness around the registries.

The samplers themselves and the time grids are registered in :mod:`ddm.expert.samplers` (one function
each, one signature, the time grid an argument). This module checks a request, makes the grid, turns a
:class:`ddm.expert.denoiser.Denoiser` and its labels into the sampler's ``model(x, t, t_next)``, and runs
the sampler without gradients. Samplers never know what is behind ``velocity``: one expert, the router's
ensemble, a distilled student, a guidance wrapper (``ddm.expert.guidance``), a :class:`CountingDenoiser`.

A sampler that integrates a step with one velocity passes the step's end ``t_next``; a denoiser that
takes the step size as an input (``StepDenoiser``: the shortcut student) is then asked for the velocity
over that step, every other denoiser for the instantaneous one.

The progressive form :func:`iter_sample` yields a :class:`Step` per step; ``callback`` receives the same
object. Both only hold references to tensors the sampler already made, so a callback is cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ddm.expert.denoiser import CallCounts, Denoiser, StepDenoiser
from ddm.expert.samplers import (  # noqa: F401  (re-exported: the sampling API in one import)
    SAMPLERS,
    TIME_GRIDS,
    Model,
    Step,
    ancestral_fraction,
    make_grid,
    stochastic_update,
)

Callback = Callable[[Step], None]


class CountingDenoiser:
    """Wraps a denoiser and counts its calls in ``calls`` (a :class:`CallCounts`: ``total_batches``
    velocity calls, ``total_rows`` rows evaluated), the counter every Counted denoiser has.

    Used to report "expert calls per sample": wrap each expert (or the whole ensemble), sample, read.
    A CFG pass through a wrapped inner denoiser is one call with 2N rows.
    """

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.num_classes = inner.num_classes
        self.calls = CallCounts()

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.add(0, x_t.shape[0])
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


def _model(denoiser: Denoiser, y: torch.Tensor) -> Model:
    """The sampler's ``model(x, t, t_next=None)``: one denoiser call at a shared time t, the output shape
    checked (a wrong model fails loudly here). With ``t_next`` a StepDenoiser gives the velocity over
    the step t -> t_next; any other denoiser, the instantaneous one."""
    over_step = isinstance(denoiser, StepDenoiser)

    def model(x: torch.Tensor, t: float, t_next: float | None = None) -> torch.Tensor:
        t_vec = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (N,)
        if over_step and t_next is not None:
            t_next_vec = torch.full((x.shape[0],), t_next, dtype=x.dtype, device=x.device)  # (N,)
            v = denoiser.step_velocity(x, t_vec, t_next_vec, y)  # (N, C, H, W)
        else:
            v = denoiser.velocity(x, t_vec, y)  # (N, C, H, W)
        if v.shape != x.shape:
            raise ValueError(
                f"{type(denoiser).__name__}.velocity returned shape {tuple(v.shape)} for input {tuple(x.shape)}; "
                "a denoiser must return a velocity of the same shape as x_t"
            )
        return v.to(x.dtype)

    return model


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
    time_grid: str = "uniform",
) -> Iterator[Step]:
    """Progressive sampler: yields one :class:`Step` per step; the last Step's ``x`` is the sample.

    noise (N, C, H, W) is x at t = 1; y (N,) long labels (``denoiser.num_classes`` = unconditional).
    ``sampler`` and ``time_grid`` name entries of ``SAMPLERS`` and ``TIME_GRIDS``; ``churn`` and ``generator``
    are used by stochastic samplers only. Bad arguments raise ValueError before any denoiser call.
    """
    run = SAMPLERS.get(sampler, field="sampler")
    if not (isinstance(churn, (int, float)) and 0 <= churn <= 1):
        raise ValueError(f"churn must be a number in [0, 1], got {churn!r}")
    _check_inputs(denoiser, noise, y, steps)
    ts = make_grid(time_grid, steps, time_shift)  # steps + 1 floats, 1 -> 0
    fresh = lambda x: _fresh_noise(x, generator)  # noqa: E731
    return _no_grad(run(_model(denoiser, y), noise, ts, noise=fresh, churn=float(churn)))


@torch.no_grad()
def _no_grad(steps: Iterator[Step]) -> Iterator[Step]:
    yield from steps


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
    time_grid: str = "uniform",
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
        time_grid=time_grid,
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
    """Denoiser calls one sampling run makes (the sampler's registered ``calls``)."""
    return SAMPLERS.entry(sampler, field="sampler").calls(steps)
