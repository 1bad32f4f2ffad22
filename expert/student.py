"""A distilled student behind the one Denoiser interface: guidance and step size are *inputs*.

The student (trained by ``ddm.router.distill``) is a DiT that also takes the guidance scale w and,
for a shortcut model (Frans et al. 2024, "One Step Diffusion via Shortcut Models"), the step size d.
Samplers only call ``velocity(x_t, t, y)``, so both extra inputs are fixed on the denoiser:

* ``guided(w)`` returns the student at scale w. ``ddm.expert.guidance.with_guidance`` calls it, so
  every caller that guides a denoiser (evaluation, ``ddm sample``, the router server) gets one
  network pass per step instead of the CFG pair.
* ``for_schedule(steps, sampler=..., time_shift=...)`` tells the student the sampler's time grid: a
  velocity asked for at grid time t_i is the shortcut over the step to t_{i+1}, d = t_i - t_{i+1}.
  That is only what a first-order Euler step wants; for Heun and the stochastic sampler (and any time
  off the grid) d = 0, the instantaneous flow velocity, which is what those samplers assume.

Views share the network and one call counter (``calls``: rows and batches, like the ensemble's
``CallCounts``), so evaluation counts the student's passes per sample whatever wraps it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from ddm.expert import flow
from ddm.expert.model import DiT


class StudentCalls:
    """Student passes: ``rows`` evaluated and ``batches`` (velocity calls). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows = 0
        self.batches = 0

    def add(self, rows: int) -> None:
        with self._lock:
            self.rows += rows
            self.batches += 1

    def reset(self) -> None:
        with self._lock:
            self.rows = self.batches = 0

    @property
    def total_rows(self) -> int:
        return self.rows

    @property
    def total_batches(self) -> int:
        return self.batches


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0 (1 = no guidance), got {scale!r}")
    return float(scale)


class StudentDenoiser:
    """A student DiT as a Denoiser. ``guidance`` is the scale fed to the network (1 = conditional, the
    default of an unguided call); ``grid`` the sampler's decreasing times (see module docstring)."""

    def __init__(
        self,
        module: DiT,
        *,
        guidance: float = 1.0,
        grid: Sequence[float] | None = None,
        calls: StudentCalls | None = None,
    ):
        cfg = module.config
        if not cfg.guidance_embed:
            raise ValueError("a StudentDenoiser needs a DiT with guidance_embed=True (a distilled student)")
        self.module = module
        self.num_classes = cfg.num_classes
        self.guidance = _check_scale(guidance)
        self.grid = tuple(float(t) for t in grid) if grid is not None else None
        self.calls = calls if calls is not None else StudentCalls()

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.module.config
        return (cfg.in_channels, cfg.image_size, cfg.image_size)

    @property
    def takes_step_size(self) -> bool:
        return self.module.config.step_embed

    def _view(self, **changes: object) -> StudentDenoiser:
        kw = dict(guidance=self.guidance, grid=self.grid, calls=self.calls)
        kw.update(changes)
        return StudentDenoiser(self.module, **kw)  # type: ignore[arg-type]

    def guided(self, scale: float) -> StudentDenoiser:
        """The student at guidance scale ``scale``: one pass per step, no unconditional pair."""
        return self._view(guidance=_check_scale(scale))

    def for_schedule(self, steps: int, *, sampler: str = "euler", time_shift: float = 1.0) -> StudentDenoiser:
        """The student for a sampler running ``steps`` steps on ``flow.time_grid(steps, time_shift)``."""
        if sampler != "euler" or not self.takes_step_size:
            return self._view(grid=None)
        return self._view(grid=flow.time_grid(steps, time_shift).tolist())

    def with_counter(self, calls: StudentCalls | None = None) -> StudentDenoiser:
        """The same student with its own call counter (one per served request)."""
        return self._view(calls=calls or StudentCalls())

    def step_sizes(self, t: torch.Tensor) -> torch.Tensor:
        """d (N,) for times t (N,): t_i - t_{i+1} where t equals grid time t_i (within 1e-6), else 0."""
        d = torch.zeros_like(t, dtype=torch.float32)
        if self.grid is None:
            return d
        grid = torch.tensor(self.grid, dtype=torch.float64, device=t.device)  # (S + 1,), decreasing
        dist = (t.detach().double()[:, None] - grid[None, :-1]).abs()  # (N, S), on t's device: no host sync
        near, idx = dist.min(dim=1)
        steps = (grid[:-1] - grid[1:])[idx].float()  # (N,)
        return torch.where(near < 1e-6, steps, torch.zeros_like(steps))

    @torch.no_grad()
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x_t.shape[0]
        self.calls.add(n)
        w = torch.full((n,), self.guidance, dtype=torch.float32, device=x_t.device)  # (N,)
        d = self.step_sizes(t) if self.takes_step_size else None
        return self.module(x_t, t, y, w=w, d=d).float()  # (N, C, H, W)


def for_sampling(denoiser: object, *, steps: int, sampler: str = "euler", time_shift: float = 1.0) -> object:
    """``denoiser`` told the sampling schedule when it can use it (a shortcut student), else itself."""
    schedule = getattr(denoiser, "for_schedule", None)
    return schedule(steps, sampler=sampler, time_shift=time_shift) if callable(schedule) else denoiser
