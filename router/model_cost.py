"""Parameter count and forward FLOPs per image of the router, from its config alone (no torch).

The router is the DiT's trunk (``ddm.expert.model_cost.trunk_params``/``trunk_macs``) with a FinalLayer
on one mean-pooled token producing K logits instead of the per-token unpatchify head. Same conventions:
``Cost.macs`` counts a multiply-add once (DiT's GFLOPs), ``Cost.flops`` twice (MFU).
"""

from __future__ import annotations

from typing import Protocol

from ddm.expert.model_cost import (
    Cost,
    DiTShape,
    final_layer_macs,
    final_layer_params,
    num_tokens,
    trunk_macs,
    trunk_params,
)


class RouterShape(DiTShape, Protocol):
    num_experts: int


def router_cost(cfg: RouterShape) -> Cost:
    """Parameters and forward multiply-adds per image of ``RouterNet(cfg)``."""
    d = cfg.hidden_size
    return Cost(
        parameters=trunk_params(cfg) + final_layer_params(d, cfg.num_experts),
        macs=trunk_macs(cfg) + final_layer_macs(1, d, cfg.num_experts),  # the head sees one pooled token
        tokens=num_tokens(cfg),
    )
