"""A distilled student behind the one Denoiser interface: guidance and step size are *inputs*.

The student (trained by ``ddm.router.distill``) is a DiT that also takes the guidance scale w and,
for a shortcut model (Frans et al. 2024, "One Step Diffusion via Shortcut Models"), the step size d.
Samplers only call ``velocity(x_t, t, y)``, so both extra inputs are fixed on the denoiser:

* ``guided(w)`` returns the student at scale w. ``ddm.expert.guidance.with_guidance`` calls it, so
  every caller that guides a denoiser (evaluation, ``ddm sample``, the router server) gets one
  network pass per step instead of the CFG pair.
* ``step_velocity(x_t, t, t_next, y)`` (``StepDenoiser``) is the shortcut over the step t -> t_next,
  d = t - t_next: the sampler asks for it when it takes that step with one velocity (Euler). ``velocity``
  is d = 0, the instantaneous flow velocity, which Heun and the stochastic sampler assume. So the student
  needs no copy of the sampler's grid.

Views share the network and one call counter (``calls``, a ``CallCounts``, like the ensemble's), so
evaluation counts the student's passes per sample whatever wraps it.
"""

from __future__ import annotations

import torch

from ddm.expert.denoiser import CallCounts
from ddm.expert.guidance import check_scale
from ddm.expert.model import DiT


class StudentDenoiser:
    """A student DiT as a Denoiser (and a SelfGuided, StepDenoiser, Counted one). ``guidance`` is the scale
    fed to the network (1 = conditional, the default of an unguided call)."""

    def __init__(
        self,
        module: DiT,
        *,
        guidance: float = 1.0,
        calls: CallCounts | None = None,
    ):
        cfg = module.config
        if not cfg.guidance_embed:
            raise ValueError("a StudentDenoiser needs a DiT with guidance_embed=True (a distilled student)")
        self.module = module
        self.num_classes = cfg.num_classes
        self.class_names: list[str] | None = None  # label i's name, when known (set by load_denoiser)
        self.guidance = check_scale(guidance)
        self.calls = calls if calls is not None else CallCounts()

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
        kw = dict(guidance=self.guidance, calls=self.calls)
        kw.update(changes)
        return StudentDenoiser(self.module, **kw)  # type: ignore[arg-type]

    def guided(self, scale: float) -> StudentDenoiser:
        """The student at guidance scale ``scale``: one pass per step, no unconditional pair."""
        return self._view(guidance=check_scale(scale))

    def with_counter(self, calls: CallCounts | None = None) -> StudentDenoiser:
        """The same student with its own call counter (one per served request)."""
        return self._view(calls=calls or CallCounts())

    @torch.no_grad()
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The instantaneous flow velocity (d = 0 for a shortcut student)."""
        d = torch.zeros_like(t, dtype=torch.float32) if self.takes_step_size else None  # (N,)
        return self._forward(x_t, t, y, d)

    @torch.no_grad()
    def step_velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """The velocity over the step t -> t_next: the shortcut with d = t - t_next (N,) when the student
        takes a step size, else the flow velocity."""
        d = (t.double() - t_next.double()).float() if self.takes_step_size else None  # (N,)
        return self._forward(x_t, t, y, d)

    def _forward(
        self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, d: torch.Tensor | None
    ) -> torch.Tensor:
        n = x_t.shape[0]
        self.calls.add(0, n)
        w = torch.full((n,), self.guidance, dtype=torch.float32, device=x_t.device)  # (N,)
        return self.module(x_t, t, y, w=w, d=d).float()  # (N, C, H, W)
