"""Autoencoders for latent-space diffusion: one registry (``AUTOENCODERS``), filled here and nowhere else.

An entry is a loader ``load(path, device) -> Autoencoder``. An :class:`Autoencoder` maps images in the
model range [-1, 1] (N, C, H, W) to *raw* latents (N, c, h, w) and back. The experts, the router and the
student never see raw latents: they train on

    z = (raw - shift) * scale                     (normalize)
    raw = z / scale + shift                       (denormalize)

with ``scale`` and ``shift`` computed once from the data (:func:`latent_stats`: shift = the mean of the
raw latents, scale = 1 / their standard deviation around it, so z has zero mean and unit variance, which is
the SD-style scaling factor with a mean shift as in SD3/Flux) and recorded beside the latents, in every
partition index and in every checkpoint trained on them.

Entries:

* ``diffusers-kl``: a diffusers-format ``AutoencoderKL`` directory (``config.json`` and
  ``diffusion_pytorch_model.safetensors``: the SD-VAE format of the paper). It is loaded with
  ``use_safetensors=True`` only (never a pickled ``.bin``) and encoded deterministically with the mode of
  its latent distribution, so the cache of latents is reproducible.

This module imports no torch and no diffusers at module level, so ``ddm --help`` builds the field's
choices without loading them. To add an autoencoder: one decorated loader here and one test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ddm.core.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

NONE = "none"  # pixel space: no autoencoder


class Autoencoder(Protocol):
    """Images [-1, 1] (N, C, H, W) <-> raw latents (N, c, h, w), on ``device``."""

    name: str
    device: Any

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, z: Tensor) -> Tensor: ...

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]: ...


Loader = Callable[[str, Any], Autoencoder]
AUTOENCODERS: Registry[Loader] = Registry("autoencoder")


def autoencoder_names() -> tuple[str, ...]:
    """'none' (pixel space) and every registered autoencoder: the choices of ``latent.autoencoder``."""
    return (NONE, *AUTOENCODERS.names())


def load_autoencoder(name: str, path: str, device: Any = "cpu") -> Autoencoder:
    """The autoencoder ``name`` from the local directory ``path``; errors name ``latent.autoencoder``."""
    if name == NONE:
        raise ValueError("latent.autoencoder is 'none' (pixel space): there is no autoencoder to load")
    return AUTOENCODERS.get(name, field="latent.autoencoder")(path, device)


# ------------------------------------------------------------------------------------- scale and shift


@dataclass(frozen=True)
class LatentStats:
    """z = (raw - shift) * scale. JSON-able via :meth:`to_json`; recorded wherever latents go."""

    scale: float
    shift: float

    def to_json(self) -> dict[str, float]:
        return {"scale": self.scale, "shift": self.shift}


def latent_stats(count: int, total: float, total_sq: float) -> LatentStats:
    """scale and shift from the running sums of the raw latents' values: shift = mean, scale = 1 / std.

    ``count`` values with sum ``total`` and sum of squares ``total_sq`` (float64 sums over every latent
    value of the dataset, accumulated batch by batch so the dataset never sits in memory as floats).
    """
    if count < 2:
        raise ValueError(f"latent scale needs at least 2 latent values, got {count}")
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    if not math.isfinite(var) or var <= 1e-12:
        raise ValueError(
            f"the latents have variance {var!r}: the autoencoder maps every image to the same point; "
            "check latent.path (a broken or untrained autoencoder) or set latent.scale by hand"
        )
    return LatentStats(scale=1.0 / math.sqrt(var), shift=mean)


def normalize(raw: Tensor, stats: LatentStats) -> Tensor:
    return (raw - stats.shift) * stats.scale


def denormalize(z: Tensor, stats: LatentStats) -> Tensor:
    return z / stats.scale + stats.shift


class LatentCodec:
    """An autoencoder with its scale and shift: ``encode`` images -> normalized latents z, ``decode`` z ->
    images in [-1, 1], clamped. What the curation, the samplers' final step and evaluation use."""

    def __init__(self, autoencoder: Autoencoder, stats: LatentStats):
        self.autoencoder, self.stats = autoencoder, stats

    def encode(self, x: Tensor) -> Tensor:
        return normalize(self.autoencoder.encode(x), self.stats)

    def decode(self, z: Tensor) -> Tensor:
        import torch

        with torch.no_grad():
            x = self.autoencoder.decode(denormalize(z.to(self.autoencoder.device, torch.float32), self.stats))
        return x.clamp(-1, 1)


def latent_record(name: str, path: str, stats: LatentStats, image_shape, latent_shape) -> dict[str, Any]:
    """The JSON that says a tensor is a latent: written in partition indexes and checkpoint metadata, read
    back by :func:`codec_from_record` (so a server decodes without the training config)."""
    return {
        "autoencoder": name,
        "path": path,
        **stats.to_json(),
        "image_shape": [int(d) for d in image_shape],
        "latent_shape": [int(d) for d in latent_shape],
    }


def codec_from_record(record: dict[str, Any], device: Any = "cpu") -> LatentCodec:
    """The codec a :func:`latent_record` describes; a ValueError naming the missing field."""
    for key in ("autoencoder", "path", "scale", "shift", "image_shape", "latent_shape"):
        if key not in record:
            raise ValueError(
                f"latent record has no {key!r} (has {sorted(record)}); the run's latents are unusable"
            )
    ae = load_autoencoder(str(record["autoencoder"]), str(record["path"]), device)
    return LatentCodec(ae, LatentStats(float(record["scale"]), float(record["shift"])))


# ------------------------------------------------------------------------------------------ entries


class DiffusersKL:
    """A diffusers ``AutoencoderKL`` (SD-VAE format) from a local directory, safetensors only."""

    name = "diffusers-kl"

    def __init__(self, path: str, device: Any = "cpu"):
        import os

        import torch

        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ValueError(
                "latent.autoencoder = 'diffusers-kl' needs diffusers: pip install 'ddm[latent]'"
            ) from None
        if not os.path.isdir(path):
            raise ValueError(
                f"latent.path {path!r}: not a local directory; it must hold a diffusers AutoencoderKL "
                "(config.json and diffusion_pytorch_model.safetensors, as save_pretrained writes)"
            )
        try:
            vae = AutoencoderKL.from_pretrained(
                path,
                use_safetensors=True,
                local_files_only=True,
                torch_dtype=torch.float32,
                low_cpu_mem_usage=False,  # True needs accelerate; False briefly holds a second copy (335 MB, SD-VAE)
            )
        except (OSError, ValueError) as e:
            raise ValueError(f"latent.path {path!r}: not a loadable diffusers AutoencoderKL ({e})") from None
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.down = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)
        self.in_channels = int(vae.config.in_channels)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = image_shape
        if c != self.in_channels:
            raise ValueError(
                f"the images have {c} channels but the autoencoder takes {self.in_channels}; "
                "set data.channels to match it"
            )
        if h % self.down or w % self.down:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the autoencoder's downsampling {self.down}; "
                f"set data.image_size to a multiple of {self.down}"
            )
        return (self.latent_channels, h // self.down, w // self.down)

    def encode(self, x: Tensor) -> Tensor:
        import torch

        with torch.no_grad():
            return self.vae.encode(x.to(self.device, torch.float32)).latent_dist.mode()  # (N, c, h, w)

    def decode(self, z: Tensor) -> Tensor:
        import torch

        with torch.no_grad():
            return self.vae.decode(z.to(self.device, torch.float32)).sample  # (N, C, H, W)


@AUTOENCODERS.register(
    "diffusers-kl",
    help="a diffusers AutoencoderKL directory (SD-VAE format: config.json + diffusion_pytorch_model.safetensors)",
)
def _diffusers_kl(path: str, device: Any) -> Autoencoder:
    return DiffusersKL(path, device)
