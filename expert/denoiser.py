"""The one denoiser interface shared by experts, the ensemble and the distilled student.

Convention (used everywhere in ddm): rectified flow with t in [0, 1],
    x_t = (1 - t) * x_0 + t * eps,     u = eps - x_0,
so t = 0 is data and t = 1 is pure noise, and samplers integrate dx/dt = v from t = 1 down to 0.

Conditioning is a class label per sample; ``null_label`` (== num_classes) is the unconditional label
used for classifier-free guidance.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """Anything that predicts the flow velocity. Shapes: x_t (N, C, H, W), t (N,), y (N,) -> (N, C, H, W)."""

    num_classes: int

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class ModuleDenoiser:
    """Adapts an ``nn.Module`` with ``forward(x_t, t, y)`` (e.g. the DiT) to the Denoiser interface."""

    def __init__(self, module: torch.nn.Module, num_classes: int):
        self.module = module
        self.num_classes = num_classes

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
        return self.module(x_t, t, y).float()
