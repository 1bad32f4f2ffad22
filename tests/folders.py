"""A generated image folder as a user would have one: ``root/<class>/<i>.png``, RGB, one colour and
shape family per class (so a classifier and a small diffusion model can tell them apart), seeded."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "stripes", "dots")
COLOURS = ((220, 60, 50), (60, 180, 70), (50, 90, 220), (230, 200, 40))


def make_rgb_folder(root: str, per_class: int = 50, size: int = 32, seed: int = 0) -> list[str]:
    """Write ``per_class`` RGB ``size``x``size`` PNGs into each of the four class folders; the class names."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for k, (name, colour) in enumerate(zip(CLASSES, COLOURS, strict=True)):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            r = rng.integers(size // 6, size // 3)
            if k == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            elif k == 1:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            elif k == 2:
                mask = ((xx + rng.integers(0, 4)) // 3) % 2 == 0
            else:
                mask = ((yy % 6) < 2) & ((xx % 6) < 2)
            img = np.full((size, size, 3), 245, np.float32)
            img[mask] = colour
            img += rng.normal(0, 6, img.shape)
            Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB").save(
                os.path.join(root, name, f"{i:04d}.png")
            )
    return sorted(CLASSES)
