"""The DiT size registry: names to shapes, with no torch import, so configs and ``--help`` can list
the choices without loading the network code."""

from __future__ import annotations

# Size registry: (depth, hidden, heads), mlp ratio 4. The T/M sizes are for CPUs; S/B/L/XL are the DiT
# paper's (Table 4; DDM's ImageNet experts are DiT-B/2 and DiT-XL/2). 3B stands for DDM's LAION experts,
# whose shape the paper does not give: DiT's scaling family one step past XL (deeper and wider, L/XL's 16
# heads, head dim 128, a power-of-two width for tensor cores and FSDP shards): at 32x32x4 latents with
# patch 2, 3,036,360,720 parameters and 527.2 GFLOPs (multiply-adds) per image (`ddm models`).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "T": (4, 128, 4),
    "M": (6, 192, 6),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "3B": (40, 2048, 16),
}
DIT_ARCHS: tuple[str, ...] = tuple(f"DiT-{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8))
