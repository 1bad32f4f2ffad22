"""Parameter counts and forward FLOPs per image of the DiT, from its config alone (no torch, no weights).

Each part of ``ddm.expert.model.DiT`` has one pair of functions (parameters, multiply-adds) that reads
like the module it counts; ``dit_cost`` adds them up. The parameter count equals
``sum(p.numel() for p in DiT(cfg).parameters())`` exactly (tests build the module on the meta device).

FLOP convention: DiT (Peebles & Xie 2023, Table 4) counts one multiply-add as one FLOP, so ``Cost.macs``
is the figure to compare with the paper's "Gflops" (DiT-XL/2 at 256 px: 118.6). torch's FLOP counter
and our MFU count two FLOPs per multiply-add: ``Cost.flops = 2 * macs``. Counted: every matmul (patch
embedding, the t/w/d embedding MLPs, adaLN-Zero modulation, qkv and output projections, the
softmax-free attention matmuls q·kᵀ and p·v, the MLP, the final layer). Not counted: norms,
activations, softmax, modulation arithmetic and embedding lookups (elementwise, O(T·D), not matmuls).

Against facebookresearch/DiT at the same shape, our module has
  * the same class table, num_classes + 1 rows (the last row is the null class; DiT's 1001 at ImageNet);
  * a fixed sin-cos position embedding held as a buffer: DiT's is a frozen ``nn.Parameter``, which its
    ``sum(p.numel())`` counts (T·D more);
  * velocity output of C channels: DiT learns the variance too (learn_sigma: 2C output channels);
  * optional guidance (w) and step-size (d) embedders of a distilled student, each one more t-embedder.
``dit_reference_parameters`` gives the count DiT's own code reports (675,129,632 for XL/2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

FREQ_DIM = 256  # sinusoidal features fed to every TimestepEmbedder's MLP


class DiTShape(Protocol):
    """What the counts read from a ``DiTConfig`` (or a ``RouterConfig``, which has the same trunk)."""

    image_size: int
    in_channels: int
    patch_size: int
    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    num_classes: int


@dataclass(frozen=True)
class Cost:
    parameters: int
    macs: int  # forward multiply-adds per image (DiT's "FLOPs")
    tokens: int

    @property
    def flops(self) -> int:
        """Forward FLOPs per image at 2 per multiply-add (torch.utils.flop_counter, MFU)."""
        return 2 * self.macs

    @property
    def gflops(self) -> float:
        """DiT's convention: GFLOPs per image = 1e-9 x multiply-adds."""
        return self.macs / 1e9


def num_tokens(cfg: DiTShape) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


def linear_params(d_in: int, d_out: int) -> int:
    return d_in * d_out + d_out  # weight + bias


def patch_embed_params(cfg: DiTShape) -> int:
    """Conv2d(C, D, kernel = stride = p): a linear map of each p x p x C patch."""
    return linear_params(cfg.in_channels * cfg.patch_size**2, cfg.hidden_size)


def patch_embed_macs(cfg: DiTShape) -> int:
    return num_tokens(cfg) * cfg.in_channels * cfg.patch_size**2 * cfg.hidden_size


def embedder_params(d: int) -> int:
    """TimestepEmbedder: Linear(256, D) -> SiLU -> Linear(D, D)."""
    return linear_params(FREQ_DIM, d) + linear_params(d, d)


def embedder_macs(d: int) -> int:
    return FREQ_DIM * d + d * d  # once per image, not per token


def block_params(d: int, mlp_ratio: float) -> int:
    """DiTBlock: qkv, proj, MLP (D -> rD -> D), adaLN-Zero Linear(D, 6D); the LayerNorms have no affine."""
    h = int(d * mlp_ratio)
    attention = linear_params(d, 3 * d) + linear_params(d, d)
    return attention + linear_params(d, h) + linear_params(h, d) + linear_params(d, 6 * d)


def block_macs(tokens: int, d: int, mlp_ratio: float) -> int:
    h = int(d * mlp_ratio)
    projections = tokens * (3 * d * d + d * d)  # qkv and output projection
    attention = 2 * tokens * tokens * d  # q·kᵀ (T x T per head, T²·D over all heads) and p·v (T²·D)
    mlp = tokens * 2 * d * h
    modulation = 6 * d * d  # adaLN-Zero: one (D -> 6D) per image
    return projections + attention + mlp + modulation


def final_layer_params(d: int, out: int) -> int:
    """FinalLayer: adaLN Linear(D, 2D) and Linear(D, out) per token."""
    return linear_params(d, 2 * d) + linear_params(d, out)


def final_layer_macs(tokens: int, d: int, out: int) -> int:
    return 2 * d * d + tokens * d * out


def trunk_params(cfg: DiTShape) -> int:
    """Patch embedding, t embedder, class table (with the null row) and blocks: DiT and router alike."""
    d = cfg.hidden_size
    return (
        patch_embed_params(cfg)
        + embedder_params(d)
        + (cfg.num_classes + 1) * d
        + cfg.depth * block_params(d, cfg.mlp_ratio)
    )


def trunk_macs(cfg: DiTShape) -> int:
    d = cfg.hidden_size
    blocks = cfg.depth * block_macs(num_tokens(cfg), d, cfg.mlp_ratio)
    return patch_embed_macs(cfg) + embedder_macs(d) + blocks


def dit_cost(cfg: DiTShape) -> Cost:
    """Parameters and forward multiply-adds per image of ``DiT(cfg)``."""
    d, t = cfg.hidden_size, num_tokens(cfg)
    out = cfg.patch_size**2 * cfg.in_channels
    extra = int(getattr(cfg, "guidance_embed", False)) + int(getattr(cfg, "step_embed", False))
    return Cost(
        parameters=trunk_params(cfg) + extra * embedder_params(d) + final_layer_params(d, out),
        macs=trunk_macs(cfg) + extra * embedder_macs(d) + final_layer_macs(t, d, out),
        tokens=t,
    )


def dit_reference_parameters(cfg: DiTShape) -> int:
    """What facebookresearch/DiT's ``sum(p.numel())`` reports for this shape (learn_sigma, no student
    embedders): ours plus its frozen position-embedding Parameter and the variance half of the output
    layer."""
    d, t, out = cfg.hidden_size, num_tokens(cfg), cfg.patch_size**2 * cfg.in_channels
    base = trunk_params(cfg) + final_layer_params(d, 2 * out)
    return base + t * d


def dit_reference_macs(cfg: DiTShape) -> int:
    """Forward multiply-adds of facebookresearch/DiT at this shape (2C output channels)."""
    d, t, out = cfg.hidden_size, num_tokens(cfg), cfg.patch_size**2 * cfg.in_channels
    return trunk_macs(cfg) + final_layer_macs(t, d, 2 * out)
