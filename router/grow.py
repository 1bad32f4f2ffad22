"""A router for a changed set of experts, started from the old one (expert lifecycle: add, retire).

The trunk (patch and (t, y) embeddings, blocks, the head's adaLN) does not depend on K, so it is copied
as it is; only the head's last linear layer has one row per expert. ``expert_map[j]`` says where output
j of the new router comes from: an old output index (its row and bias are copied) or ``NEW`` (-1) for a
new expert, whose row and bias start at the mean of the old ones, so its logit starts at the average
expert's and the old experts' relative probabilities are unchanged at the first step.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ddm.router.model import RouterNet, load_router_checkpoint

HEAD_WEIGHT, HEAD_BIAS = "head.linear.weight", "head.linear.bias"
NEW = -1  # expert_map entry of an expert the old router did not have


def remap_head(state: dict[str, torch.Tensor], expert_map: list[int]) -> dict[str, torch.Tensor]:
    """``state`` (a RouterNet state dict with K outputs) with its head rows rearranged to
    ``len(expert_map)`` outputs; everything else is shared, unchanged."""
    w, b = state[HEAD_WEIGHT], state[HEAD_BIAS]  # (K, D), (K,)
    k_old = w.shape[0]
    bad = [i for i in expert_map if i != NEW and not 0 <= i < k_old]
    if bad:
        raise ValueError(f"expert_map names outputs {bad}, but the old router has outputs 0..{k_old - 1}")
    rows = [w[i] if i != NEW else w.mean(0) for i in expert_map]
    biases = [b[i] if i != NEW else b.mean() for i in expert_map]
    return {**state, HEAD_WEIGHT: torch.stack(rows), HEAD_BIAS: torch.stack(biases)}  # (K', D), (K',)


def grown_router(url: str, expert_map: list[int], *, ema: bool = True) -> RouterNet:
    """A trainable RouterNet with ``len(expert_map)`` outputs, initialised from the router checkpoint at
    ``url`` (its EMA weights by default, what it served)."""
    old, _ = load_router_checkpoint(url, ema=ema)
    cfg = replace(old.config, num_experts=len(expert_map))
    net = RouterNet(cfg)
    net.load_state_dict(remap_head(old.state_dict(), expert_map))
    return net.train().requires_grad_(True)
