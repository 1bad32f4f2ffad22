"""Test inputs for latent space: a small randomly initialised diffusers AutoencoderKL written by
``save_pretrained`` (no weights can be downloaded here), and a generated RGB folder of coloured shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def tiny_vae(directory: Path, *, seed: int = 0) -> Path:
    """A 2-level AutoencoderKL (8 channels, 4 latent channels, downsampling 2) saved as safetensors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32,
    )  # fmt: skip
    vae.save_pretrained(directory, safe_serialization=True)
    return directory


def shapes_folder(directory: Path, per_class: int = 40, size: int = 32, seed: int = 0) -> Path:
    """An image folder of two classes, filled circles and squares of random colour, place and size."""
    rng = np.random.default_rng(seed)
    for cls in ("circle", "square"):
        (directory / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 80, 3)))
            r = int(rng.integers(size // 6, size // 3))
            cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
            box = (cx - r, cy - r, cx + r, cy + r)
            colour = tuple(int(c) for c in rng.integers(120, 256, 3))
            draw = ImageDraw.Draw(im)
            (draw.ellipse if cls == "circle" else draw.rectangle)(box, fill=colour)
            im.save(directory / cls / f"{i:03d}.png")
    return directory
