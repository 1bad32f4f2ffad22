"""The router size registry: names to shapes, with no torch import (configs and ``--help`` list the
choices without loading the network code)."""

from __future__ import annotations

# Size registry: (depth, hidden, heads). Against the demo's DiT-T/4 (1.28M parameters), Router-T/4 is
# 31% of its parameters and 29% of its FLOPs, Router-XS/4 20% and 20%; the paper's router is ~18% of
# an expert. Both reached the same held-out accuracy vs t on two Fashion-MNIST class-group partitions.
# B is DiT-B's shape, the paper's router beside DiT-XL/2 experts: Router-B/2 at 32x32x4 with K = 8 is
# 19.3% of DiT-XL/2's parameters and 19.4% of its FLOPs (`ddm models`). (Until this change B named a
# (6, 384, 6) router that no config used; router checkpoints store their full shape, so they still load.)
ROUTER_SIZES: dict[str, tuple[int, int, int]] = {
    "XS": (3, 64, 4),
    "T": (2, 96, 4),
    "S": (3, 128, 4),
    "M": (4, 192, 6),
    "B": (12, 768, 12),
}
ROUTER_ARCHS: tuple[str, ...] = tuple(f"Router-{s}/{p}" for s in ROUTER_SIZES for p in (2, 4, 8))
