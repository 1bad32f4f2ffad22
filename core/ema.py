"""Exponential moving average of the weights: the weights samplers and servers use.

The EMA holds its own copy of the network (``ema.module``), so sampling code can call it like any
model. The update is one fused ``torch._foreach_lerp_`` over all parameters: one pass over the
weights per step and no Python loop over tensors.

The average is bias-corrected as in Adam (Kingma & Ba 2015, sec. 3): after step t the EMA weights are
the normalised exponentially weighted mean of the weights w_1..w_t,

    ema_t = sum_i d^(t-i) (1 - d) w_i / (1 - d^t),

which is the recursion ema_t = lerp(ema_{t-1}, w_t, 1 - decay_t) with

    decay_t = d (1 - d^(t-1)) / (1 - d^t)      (0 at t = 1, -> d as t grows).

So the initial network (whose adaLN-Zero output is exactly zero) gets no weight at all, and the
configured decay holds from the first step: a short run (a few hundred steps at d = 0.995) samples
from a proper average of its recent weights, not a blend with the initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(step: int, decay: float) -> float:
    """decay_t applied after optimizer step ``step`` (1-based); see the module docstring."""
    if step < 1:
        raise ValueError(f"step is 1-based, got {step}")
    return decay * (1.0 - decay ** (step - 1)) / (1.0 - decay**step)


class EMA:
    """EMA of ``model``'s parameters. Bound to ``model`` at construction; call ``update(step)`` after
    every optimizer step. Only parameters are averaged (the DiT's one buffer is a fixed constant).

    ``module``: the averaged copy when the caller made it (under FSDP, a twin sharded like ``model``, so
    the average is sharded too); by default a deep copy of ``model``."""

    def __init__(self, model: nn.Module, decay: float, *, module: nn.Module | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.module = (copy.deepcopy(model) if module is None else module).eval().requires_grad_(False)
        self._source = list(model.parameters())
        self._target = list(self.module.parameters())
        assert len(self._source) == len(self._target)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """ema <- decay_t * ema + (1 - decay_t) * model, i.e. lerp(ema, model, 1 - decay_t)."""
        torch._foreach_lerp_(self._target, self._source, 1.0 - ema_decay_at(step, self.decay))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
