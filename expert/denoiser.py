"""The one denoiser interface shared by experts, the ensemble and the distilled student.

Convention (used everywhere in ddm): rectified flow with t in [0, 1],
    x_t = (1 - t) * x_0 + t * eps,     u = eps - x_0,
so t = 0 is data and t = 1 is pure noise, and samplers integrate dx/dt = v from t = 1 down to 0.

Conditioning is a class label per sample; ``null_label`` (== num_classes) is the unconditional label
used for classifier-free guidance.

Optional abilities are Protocols too, checked with ``isinstance`` (never ``getattr``):

* :class:`SelfGuided`  ``guided(scale)``: applies classifier-free guidance itself (the ensemble routes both
  passes through the same experts; the student takes the scale as an input);
* :class:`StepDenoiser` ``step_velocity(x_t, t, t_next, y)``: the velocity over a whole step (a shortcut
  student); samplers that take a step with one velocity ask for it;
* :class:`Counted`     ``calls``: a :class:`CallCounts` of its own model calls;
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """Anything that predicts the flow velocity. Shapes: x_t (N, C, H, W), t (N,), y (N,) -> (N, C, H, W)."""

    num_classes: int

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SelfGuided(Protocol):
    """A denoiser that applies classifier-free guidance itself (``ddm.expert.guidance.with_guidance``)."""

    def guided(self, scale: float) -> Denoiser: ...


@runtime_checkable
class StepDenoiser(Protocol):
    """A denoiser whose prediction can cover a whole step t -> t_next (t_next (N,) < t): a shortcut model
    (Frans et al. 2024). ``velocity`` is still the instantaneous flow velocity."""

    num_classes: int

    def step_velocity(
        self, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor: ...


class CallCounts:
    """The one model-call counter: ``rows[k]`` rows evaluated by model k (a guided pass counts 2 per
    sample) and ``batches[k]`` calls made to it; ``router`` router calls (an ensemble's) and
    ``router_rows`` the rows they carried (ensemble-level guidance routes 2 per sample). One slot for a
    single model (a student, a :class:`ddm.expert.sampling.CountingDenoiser`), one per expert for an
    ensemble. Thread-safe (a server shares one between requests). Rows per sample per step =
    total_rows / (samples * steps)."""

    def __init__(self, num_models: int = 1):
        self._lock = threading.Lock()
        self.rows = [0] * num_models
        self.batches = [0] * num_models
        self.router = 0
        self.router_rows = 0

    def add(self, model: int, rows: int) -> None:
        with self._lock:
            self.rows[model] += rows
            self.batches[model] += 1

    def add_router(self, rows: int = 0) -> None:
        with self._lock:
            self.router += 1
            self.router_rows += rows

    def reset(self) -> None:
        with self._lock:
            self.rows = [0] * len(self.rows)
            self.batches = [0] * len(self.batches)
            self.router = 0
            self.router_rows = 0

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def total_batches(self) -> int:
        return sum(self.batches)


@runtime_checkable
class Counted(Protocol):
    """A denoiser that counts its own model calls (the ensemble per expert, the student)."""

    calls: CallCounts


class ModuleDenoiser:
    """Adapts an ``nn.Module`` with ``forward(x_t, t, y)`` (e.g. the DiT) to the Denoiser interface.

    ``objective`` (a name in ``ddm.expert.objectives.OBJECTIVES``) is what the module predicts; its
    prediction is converted to the velocity exactly here, at the denoiser boundary, so everything past
    it (samplers, guidance, the ensemble, the expert server's wire) sees velocities only. The default,
    ``velocity``, passes the module's output through unchanged."""

    def __init__(self, module: torch.nn.Module, num_classes: int, objective: str = "velocity"):
        from ddm.expert.objectives import OBJECTIVES

        self.module = module
        self.num_classes = num_classes
        self.objective = OBJECTIVES.get(objective, field="objective")
        self.class_names: list[str] | None = None  # label i's name, when known (set by load_denoiser)

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image, when the module knows it (the DiT does)."""
        cfg = self.module.config
        return (cfg.in_channels, cfg.image_size, cfg.image_size)

    @torch.no_grad()
    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.objective.name == "velocity":
            return self.module(x_t, t, y).float()  # no conversion: the numerics of the plain module
        return self.objective.velocity(self.module, x_t, t, y)
