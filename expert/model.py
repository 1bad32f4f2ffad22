"""DiT (Peebles & Xie, 2023) as a flow-matching velocity network.

Patchify -> transformer blocks with adaLN-Zero conditioning on (t, class) -> linear unpatchify.
The class embedding table has one extra row, the null class (index ``num_classes``), used for
classifier-free guidance dropout. Attention goes through ``F.scaled_dot_product_attention``.

A distilled student (``ddm.router.distill``) is the same network with up to two more scalar inputs,
each embedded like t and added to the conditioning vector: the guidance scale w
(``guidance_embed``) and the step size d of a shortcut model (``step_embed``; Frans et al. 2024).
Both default to off, so expert checkpoints and their metadata are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ddm.expert.model_cost import dit_cost
from ddm.expert.sizes import DIT_ARCHS, DIT_SIZES


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """Everything needed to rebuild the network; stored in every checkpoint's metadata."""

    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    guidance_embed: bool = False  # a student: the CFG scale w is an input (one pass per step)
    step_embed: bool = False  # a shortcut student: the step size d is an input (d = 0: the flow)

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

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        """The config as stored in checkpoints; the student flags only when set, so an expert's
        metadata stays exactly what it was before students existed."""
        d = asdict(self)
        for key in ("guidance_embed", "step_embed"):
            if not d[key]:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        return cls(**d)


def dit_config(
    arch: str,
    *,
    image_size: int,
    in_channels: int,
    num_classes: int,
    guidance_embed: bool = False,
    step_embed: bool = False,
) -> DiTConfig:
    """Build a DiTConfig from a registry name such as ``"DiT-T/4"`` or ``"DiT-XL/2"``."""
    try:
        size, patch = arch.removeprefix("DiT-").split("/")
        depth, hidden, heads = DIT_SIZES[size]
        patch_size = int(patch)
    except (ValueError, KeyError):
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(DIT_ARCHS)}") from None
    return DiTConfig(
        image_size=image_size,
        in_channels=in_channels,
        patch_size=patch_size,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        guidance_embed=guidance_embed,
        step_embed=step_embed,
    )


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (scaled to [0, 1000] like DiT) followed by an MLP.

    ``scale`` maps the input to that range: 1000 for t and d in [0, 1], 100 for a guidance scale in
    about [0, 10]."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = (t.float() * self.scale)[:, None] * freqs[None]  # (N, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, heads, T, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, head_dim)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim)."""
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed(gy), embed(gx)], dim=1).float()


class DiT(nn.Module):
    """Velocity network v(x_t, t, y). y == num_classes is the null (unconditional) class."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c, p, d = config.in_channels, config.patch_size, config.hidden_size
        self.x_embedder = nn.Conv2d(c, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Embedding(config.num_classes + 1, d)
        self.w_embedder = TimestepEmbedder(d, scale=100.0) if config.guidance_embed else None
        self.d_embedder = TimestepEmbedder(d) if config.step_embed else None
        grid = config.image_size // p
        self.register_buffer("pos_embed", sincos_pos_embed(d, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, p, c)
        self._init_weights()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

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
        for extra in (self.w_embedder, self.d_embedder):
            if extra is not None:  # zero output: a student starts as the network it was initialised from
                nn.init.normal_(extra.mlp[0].weight, std=0.02)
                nn.init.zeros_(extra.mlp[2].weight)
        # adaLN-Zero: every residual branch and the output start at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        p, c = self.config.patch_size, self.config.in_channels
        g = self.config.image_size // p
        x = x.reshape(n, g, g, p, p, c)  # (N, gh, gw, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor | None = None,
        d: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v(x_t, t, y) (N, C, H, W); a student also takes the guidance scale w (N,) and step size d (N,)."""
        x = self.x_embedder(x_t).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        if self.w_embedder is not None:
            if w is None:
                raise ValueError(
                    "this DiT takes the guidance scale w as an input (a distilled student); pass w (N,)"
                )
            c = c + self.w_embedder(w)  # (N, D)
        if self.d_embedder is not None:
            c = c + self.d_embedder(torch.zeros_like(t) if d is None else d)  # (N, D); d = 0: the flow
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C)
        return self.unpatchify(x)  # (N, C, H, W)

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs per image (2 per multiply-add; ``ddm.expert.model_cost``), for MFU.
        Backward is ~2x forward."""
        return float(dit_cost(self.config).flops)
