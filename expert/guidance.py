"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper, so samplers never change.

In velocity form: v = v_u + w (v_c - v_u), with v_u the prediction for the null label
(``num_classes``). w = 1 is the conditional model, w = 0 the unconditional one, w > 1 sharpens.
"""

from __future__ import annotations

import math

import torch

from ddm.expert.denoiser import Denoiser, SelfGuided


def guided(v_c: torch.Tensor, v_u: torch.Tensor, scale: float) -> torch.Tensor:
    """v_u + scale * (v_c - v_u). Pure; the router's ensemble reuses it on mixed velocities."""
    return v_u + scale * (v_c - v_u)


def check_scale(scale: float) -> float:
    """The guidance scale as a float; ValueError for anything but a finite number >= 0. The one check
    every guided denoiser (CFG wrapper, ensemble, oracle, student) uses."""
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale < 0
    ):
        raise ValueError(
            f"guidance scale must be a finite number >= 0 (1 = no guidance, 0 = unconditional), got {scale!r}"
        )
    return float(scale)


class CFGDenoiser:
    """A Denoiser that applies classifier-free guidance to ``inner``.

    For scale not in {0, 1} the conditional and unconditional passes go through ``inner`` in one
    batched call of 2N rows (conditional first), which is what an expert server wants: one request
    per step. scale == 1 makes only the conditional call, scale == 0 only the unconditional one.
    Rows whose label already is the null label get v_c == v_u, i.e. the unconditional velocity.
    """

    def __init__(self, inner: Denoiser, scale: float):
        self.inner = inner
        self.scale = check_scale(scale)
        self.num_classes = inner.num_classes

    @property
    def null_label(self) -> int:
        return self.num_classes

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return self.inner.velocity(x_t, t, y)
        y_null = torch.full_like(y, self.null_label)  # (N,)
        if self.scale == 0.0:
            return self.inner.velocity(x_t, t, y_null)
        v = self.inner.velocity(
            torch.cat([x_t, x_t]),  # (2N, C, H, W)
            torch.cat([t, t]),  # (2N,)
            torch.cat([y, y_null]),  # (2N,)
        )  # (2N, C, H, W)
        v_c, v_u = v.chunk(2)  # (N, C, H, W) each
        return guided(v_c, v_u, self.scale)


def with_guidance(denoiser: Denoiser, scale: float) -> Denoiser:
    """The guided version of any denoiser.

    A denoiser that guides itself (:class:`SelfGuided`: the ensemble, which must send conditional and
    unconditional rows through the same selected experts; the student, whose input the scale is) does
    so; anything else gets the CFG wrapper.
    """
    return (
        denoiser.guided(check_scale(scale))
        if isinstance(denoiser, SelfGuided)
        else CFGDenoiser(denoiser, scale)
    )
