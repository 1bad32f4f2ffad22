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


# --------------------------------------------------------------------------------------- guidance modes
# How classifier-free guidance meets the ensemble (ARCHITECTURE.md, "Guidance"). A mode is a rule with
# one signature:
#
#     mode(x_t, t, y, y_null, scale, *, route, mix) -> v
#
# route(x, t, y) -> weights (N, K) runs the router (or reuses a recent decision: ``route_every``) and
# applies the strategy; mix(x, t, y, weights, *, scale=1) -> sum_k weights[:, k] v_k(x, t, y) (each v_k
# guided by ``scale`` inside expert k when scale != 1), one call per selected expert on its rows. Both modes agree at scale 1 (conditional: routed with y) and scale 0
# (unconditional: routed with the null label, never by class); they differ for any other scale.

GuidanceMode = Callable[..., "Tensor"]
GUIDANCE_MODES: Registry[GuidanceMode] = Registry("guidance mode", required=("exact",))


def _one_pass(
    x_t: Tensor, t: Tensor, y: Tensor, y_null: Tensor, scale: float, route: Callable, mix: Callable
):
    """Scale 1 or 0: one mixture, routed with the label it is evaluated with (y, or null for 0)."""
    labels = y if scale == 1.0 else y_null
    return mix(x_t, t, labels, route(x_t, t, labels))


@GUIDANCE_MODES.register(
    "ensemble",
    help="the monolith's guided flow: v_u + s (v_c - v_u) with v_c routed with the label and v_u routed with "
    "the null label (each mixture with its own weights); exact with a perfect router",
    exact=True,
)
def ensemble_guidance(
    x_t: Tensor, t: Tensor, y: Tensor, y_null: Tensor, scale: float, *, route: Callable, mix: Callable
) -> Tensor:
    if scale in (0.0, 1.0):
        return _one_pass(x_t, t, y, y_null, scale, route, mix)
    import torch  # here, not at module level: the CLI reads this registry without loading torch

    n = x_t.shape[0]
    x2, t2, y2 = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, y_null])  # (2N, ...): [cond; uncond]
    # one router pass over both halves, then one call per expert selected by either half
    v_c, v_u = mix(x2, t2, y2, route(x2, t2, y2)).split([n, n])  # (N, C, H, W) each
    return v_u + scale * (v_c - v_u)


@GUIDANCE_MODES.register(
    "expert",
    help="guidance inside each expert the conditional routing selects, mixed with the conditional weights: "
    "sum_k p(k|x_t,t,c) (v_k,u + s (v_k,c - v_k,u)); not exact, the first version's rule",
    exact=False,
)
def expert_guidance(
    x_t: Tensor, t: Tensor, y: Tensor, y_null: Tensor, scale: float, *, route: Callable, mix: Callable
) -> Tensor:
    if scale in (0.0, 1.0):
        return _one_pass(x_t, t, y, y_null, scale, route, mix)
    return mix(x_t, t, y, route(x_t, t, y), scale=scale)
