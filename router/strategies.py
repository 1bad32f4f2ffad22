"""The ensemble strategies: which experts an ensemble step evaluates, one registry filled here.

A strategy is a selection rule over the router's probabilities, one signature for all:

    rule(probs, *, top_k, threshold) -> weights

probs (N, K) are p(k | x_t, t, y); weights (N, K) are the selected experts' probabilities renormalised to
sum to 1 per row, zeros elsewhere (``ddm.router.ensemble.Ensemble`` evaluates each expert with a nonzero
weight, on its rows only). Attributes: ``served`` (the router's Sample API offers it; those are
``STRATEGIES.names(served=True)``, also the ``--strategy`` choices of ``ddm serve``/``ddm sample``) and
``routed`` (it needs the router; ``oracle`` routes by known partition labels instead and has no rule).

This module imports no torch (tensor methods only), so the CLI reads the names for its ``choices``
without loading it. To add a strategy: one decorated function here, one test (copy
``test_a_registered_strategy_is_everywhere`` in tests/test_registries.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ddm.core.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

Rule = Callable[..., "Tensor"]
STRATEGIES: Registry[Rule | None] = Registry("strategy", required=("served", "routed"))


def _renormalised(probs: Tensor, mask: Tensor) -> Tensor:
    kept = probs.where(mask, probs.new_zeros(()))  # (N, K)
    return kept / kept.sum(dim=1, keepdim=True)


@STRATEGIES.register("top-k", help="the top_k most probable experts (top-1: best in the paper at 1/K of the compute)",
                     served=True, routed=True)  # fmt: skip
def top_k(probs: Tensor, *, top_k: int, threshold: float) -> Tensor:
    k = min(top_k, probs.shape[1])
    mask = probs.new_zeros(probs.shape, dtype=bool).scatter_(1, probs.topk(k, dim=1).indices, True)
    return _renormalised(probs, mask)


@STRATEGIES.register(
    "full", help="every expert, weighted by the router (the exact mixture formula)", served=True, routed=True
)
def full(probs: Tensor, *, top_k: int, threshold: float) -> Tensor:
    return _renormalised(probs, probs.new_ones(probs.shape, dtype=bool))


@STRATEGIES.register("threshold", help="experts with p >= threshold, always at least the most probable",
                     served=True, routed=True)  # fmt: skip
def threshold(probs: Tensor, *, top_k: int, threshold: float) -> Tensor:
    mask = (probs >= threshold).scatter_(1, probs.argmax(dim=1, keepdim=True), True)  # keep the argmax
    return _renormalised(probs, mask)


STRATEGIES.add("oracle", None, help="needs ground-truth partition labels: each row uses its partition's expert (evaluation, distillation's teacher)",
               served=False, routed=False)  # fmt: skip
