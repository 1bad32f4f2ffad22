"""The router: a small transformer that predicts p(k | x_t, t, y), which partition x_t's clean image
came from (DDM, McAllister et al. 2025, sec. 3: the marginal velocity is sum_k p(k | x_t) v_k(x_t)).

It is the DiT's trunk without the unpatchify head: patch embedding + fixed 2-D position embedding,
adaLN-Zero blocks conditioned on (t, class) with the null class (index ``num_classes``) for
unconditional passes, then tokens mean-pooled and a modulated linear head to K logits. The building
blocks are imported from ``ddm.expert.model``, so both networks read the same.

Initialisation: the blocks keep adaLN-Zero (residual branches start at zero, which is harmless), but
the head's linear layer starts small and random rather than zero. With a zero head every gradient
into the trunk is zero at step 1 (they all flow through the head's weights), so the blocks would only
start to learn a step late and the gates' first update would be wasted. Small logits still mean
near-uniform probabilities at init (cross-entropy ~ log K).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ddm.core import checkpoint
from ddm.core.checkpoint import CheckpointError
from ddm.expert.model import DiTBlock, FinalLayer, TimestepEmbedder, sincos_pos_embed
from ddm.router.model_cost import router_cost
from ddm.router.sizes import ROUTER_ARCHS, ROUTER_SIZES


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Everything needed to rebuild the router; stored in every router checkpoint's metadata."""

    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 4
    hidden_size: int = 96
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    num_experts: int = 4

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                "pick a patch size that divides the image size (e.g. 2 or 4 for 28x28)"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {self.num_classes}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1 (one logit per expert), got {self.num_experts}")

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        return cls(**d)


def router_config(
    arch: str, *, image_size: int, in_channels: int, num_classes: int, num_experts: int
) -> RouterConfig:
    """Build a RouterConfig from a registry name such as ``"Router-T/4"``."""
    try:
        size, patch = arch.removeprefix("Router-").split("/")
        depth, hidden, heads = ROUTER_SIZES[size]
        patch_size = int(patch)
    except (ValueError, KeyError):
        raise ValueError(
            f"unknown router architecture {arch!r}; choose one of {', '.join(ROUTER_ARCHS)}"
        ) from None
    return RouterConfig(
        image_size=image_size,
        in_channels=in_channels,
        patch_size=patch_size,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        num_experts=num_experts,
    )


class RouterNet(nn.Module):
    """Logits over experts for (x_t, t, y). y == num_classes is the null (unconditional) class."""

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        c, p, d = config.in_channels, config.patch_size, config.hidden_size
        self.x_embedder = nn.Conv2d(c, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Embedding(config.num_classes + 1, d)
        grid = config.image_size // p
        self.register_buffer("pos_embed", sincos_pos_embed(d, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        # The DiT's final layer on one pooled token: LayerNorm, adaLN shift/scale from c, linear to K.
        # The shift lets (t, y) alone set the logits, which is what the router must output at t = 1.
        self.head = FinalLayer(d, patch_size=1, out_channels=config.num_experts)
        self._init_weights()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def _init_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: residual branches start at zero
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.head.adaLN_modulation[-1].weight)  # identity modulation at init
        nn.init.zeros_(self.head.adaLN_modulation[-1].bias)
        nn.init.normal_(self.head.linear.weight, std=0.02)  # small, not zero: see the module docstring
        nn.init.zeros_(self.head.linear.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x_t).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        pooled = x.mean(dim=1, keepdim=True)  # (N, 1, D)
        return self.head(pooled, c).squeeze(1)  # (N, K)

    @torch.no_grad()
    def probabilities(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """softmax of the logits, float32 (N, K), without gradients; inputs are cast to the weights' dtype."""
        dtype = self.x_embedder.weight.dtype
        logits = self(x_t.to(dtype), t.to(dtype), y.long())  # (N, K)
        return torch.softmax(logits.float(), dim=-1)

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs per image (2 per multiply-add; ``ddm.router.model_cost``), like ``DiT``'s."""
        return float(router_cost(self.config).flops)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_router_checkpoint(
    url: str, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[RouterNet, dict[str, Any]]:
    """(RouterNet in eval mode without gradients, checkpoint metadata) from a router checkpoint file or
    directory: self-describing, the config comes from the safetensors header. ``ema`` picks EMA weights."""
    ckpt = checkpoint.load(url)
    meta = ckpt.meta
    if meta.get("kind") != "router":
        raise CheckpointError(f"{ckpt.url}: a {meta.get('kind')!r} checkpoint, not a router checkpoint")
    try:
        cfg = RouterConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt.url}: invalid or missing router 'model' config in metadata ({e})"
        ) from None
    prefix = "ema" if ema else "model"
    state = ckpt.prefixed(prefix)
    if not state:
        raise CheckpointError(f"{ckpt.url}: no '{prefix}.*' tensors in the checkpoint")
    model = RouterNet(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt.url}: {prefix} weights do not fit the router config in its metadata ({e})"
        ) from None
    model.to(device).eval().requires_grad_(False)
    return model, {**meta, "url": ckpt.url}


def load_router(url: str, *, ema: bool = True, device: str | torch.device = "cpu") -> RouterNet:
    """The router from its checkpoint alone (what the router server and the ensemble take)."""
    return load_router_checkpoint(url, ema=ema, device=device)[0]
