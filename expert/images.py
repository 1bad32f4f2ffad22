"""Image conversions and pictures: uint8 <-> model range, decoding files, grids and PNGs.

The model sees float images in [-1, 1]; storage, shards and pictures hold uint8 in [0, 255]. The two
conversions below are exact inverses on all 256 grey levels, so data that goes to the model range and
back (e.g. through a shard or a sampler's output) never drifts by a level.
"""

from __future__ import annotations

import io
import math

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ddm.core import storage

# Images smaller than this (in pixels per side) are upscaled by an integer factor in saved grids, so a
# 28x28 Fashion-MNIST grid is viewable without zooming (28 -> 56).
MIN_VIEW_SIZE = 56


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (same shape)."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(
            f"to_model_range expects uint8 images, got {images_uint8.dtype}; float images are already in model range"
        )
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_model_input(stored: torch.Tensor) -> torch.Tensor:
    """What a trainer feeds the network from a stored batch: uint8 pixels -> float32 [-1, 1]; float16
    latents (already normalized when the partition was written) -> float32 as they are."""
    if stored.dtype == torch.uint8:
        return to_model_range(stored)
    if stored.dtype in (torch.float16, torch.float32):
        return stored.to(torch.float32)
    raise ValueError(f"stored images must be uint8 pixels or float16 latents, got {stored.dtype}")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (same shape), clamped and rounded to the nearest level."""
    if not x.is_floating_point():
        raise ValueError(f"to_uint8 expects a float tensor in [-1, 1], got {x.dtype}")
    return ((x.detach().to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# decoding files


def decode_image(data: bytes, *, channels: int, size: int | None) -> torch.Tensor:
    """Decode an image file, convert to grey (1) or RGB (3), center-crop to square, resize to ``size``
    (``None``: keep the square's own side).

    Returns uint8 (channels, size, size). Raises whatever PIL raises for malformed data; the folder reader
    catches that and counts the file as skipped.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        im = ImageOps.exif_transpose(im)  # phone photos store rotation in EXIF, not in the pixels
        im = _flatten_alpha(im)
        im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    side = min(w, h)
    size = side if size is None else size
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != size:
        im = im.resize(
            (size, size), Image.Resampling.BICUBIC
        )  # PIL widens the kernel when shrinking (antialiased)
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)  # (size*size*channels,)
    return t.view(size, size, channels).permute(2, 0, 1).contiguous()  # (C, H, W)


GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def image_shape_of(data: bytes) -> tuple[int, int]:
    """(channels, side) an image file has on its own: 1 for a grey mode, else 3; side = the shorter edge
    (after EXIF rotation, which does not change it). Reads the header only."""
    with Image.open(io.BytesIO(data)) as im:
        mode = im.mode
        if mode == "P":  # a palette image is grey when every palette entry is
            im.load()
            mode = "L" if _palette_is_grey(im) else "RGB"
        return (1 if mode in GREY_MODES else 3), min(im.size)


def _palette_is_grey(im: Image.Image) -> bool:
    rgb = im.convert("RGB")
    r, g, b = rgb.split()
    return r.tobytes() == g.tobytes() == b.tobytes()


def _flatten_alpha(im: Image.Image) -> Image.Image:
    """Composite transparent images onto white, so transparent pixels do not turn black."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba)
    return im


# ---------------------------------------------------------------------------------------------------
# pictures


def to_pil(image: torch.Tensor) -> Image.Image:
    """One uint8 image (C, H, W), C in {1, 3}, -> PIL image (mode L or RGB)."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"expected a uint8 image of shape (1|3, H, W), got {image.dtype} {tuple(image.shape)}"
        )
    c, h, w = image.shape
    hwc = image.permute(1, 2, 0).contiguous().cpu()  # (H, W, C)
    if c == 1:
        return Image.frombytes("L", (w, h), hwc.numpy().tobytes())
    return Image.frombytes("RGB", (w, h), hwc.numpy().tobytes())


def _as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Accept uint8 images, or float images in the model range [-1, 1]."""
    return images if images.dtype == torch.uint8 else to_uint8(images)


def make_grid(
    images: torch.Tensor,
    nrow: int = 8,
    *,
    padding: int = 2,
    pad_value: int = 255,
    scale: int = 1,
) -> Image.Image:
    """Tile images (N, C, H, W) into one picture, ``nrow`` images per row.

    ``images`` is uint8, or float in the model range [-1, 1]. ``scale`` upscales every image by an
    integer factor with nearest-neighbour (pixels stay crisp). The result is ``cols*(W*scale+padding)
    + padding`` wide, with cols = min(nrow, N), and likewise tall with rows = ceil(N / nrow).
    """
    cells = _prepare_cells(images, nrow, padding, scale)
    return _paste(cells, nrow, padding, pad_value, scale, label_height=0, labels_text=None)


def save_grid(
    images: torch.Tensor,
    url: str,
    nrow: int = 8,
    labels: torch.Tensor | list[int] | None = None,
    label_names: list[str] | None = None,
    *,
    padding: int = 2,
    pad_value: int = 255,
    scale: int | None = None,
) -> Image.Image:
    """Write a grid of ``images`` as a PNG at ``url`` (atomically, any fsspec URL); returns the picture.

    With ``labels``, a line of text under each cell names its class (``label_names[label]`` when given,
    else the number), cut to the cell width. ``scale=None`` upscales small images to at least
    ``MIN_VIEW_SIZE`` pixels (2x for 28x28).
    """
    if scale is None:
        scale = max(1, math.ceil(MIN_VIEW_SIZE / max(images.shape[-2:])))
    labels_text = None
    label_height = 0
    if labels is not None:
        label_list = [int(v) for v in (labels.tolist() if torch.is_tensor(labels) else labels)]
        if len(label_list) != images.shape[0]:
            raise ValueError(f"save_grid: {len(label_list)} labels for {images.shape[0]} images")
        labels_text = [_label_text(v, label_names) for v in label_list]
        label_height = _label_height(_font())
    cells = _prepare_cells(images, nrow, padding, scale)
    grid = _paste(cells, nrow, padding, pad_value, scale, label_height, labels_text)
    save_png(grid, url)
    return grid


def save_png(image: Image.Image | torch.Tensor, url: str) -> str:
    """Write one picture (PIL image, or uint8 / model-range float tensor (C, H, W)) as a PNG, atomically."""
    if torch.is_tensor(image):
        image = to_pil(_as_uint8(image))
    storage.write_bytes(url, png_bytes(image))
    return url


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _label_text(label: int, label_names: list[str] | None) -> str:
    if label_names is not None and 0 <= label < len(label_names):
        return label_names[label]
    return str(label)


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=10)
    except (ImportError, OSError):  # Pillow built without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def _label_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    """Pixels of the text strip under each cell: the font's tallest glyphs plus a small margin."""
    return int(font.getbbox("Ag|")[3]) + 3


def _prepare_cells(images: torch.Tensor, nrow: int, padding: int, scale: int) -> torch.Tensor:
    """Validate grid arguments; uint8 cells (N, C, H*scale, W*scale)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1|3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("cannot make a grid of zero images")
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(
            f"grid needs nrow >= 1, padding >= 0, scale >= 1 (got nrow={nrow}, padding={padding}, scale={scale})"
        )
    cells = _as_uint8(images).detach().cpu()  # (N, C, H, W)
    if scale > 1:
        cells = cells.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # (N, C, H*s, W*s)
    return cells


def _paste(
    cells: torch.Tensor,
    nrow: int,
    padding: int,
    pad_value: int,
    scale: int,
    label_height: int,
    labels_text: list[str] | None,
) -> Image.Image:
    n, c, h, w = cells.shape
    cols = min(nrow, n)
    rows = math.ceil(n / nrow)
    cell_w, cell_h = w + padding, h + label_height + padding
    canvas = torch.full((c, rows * cell_h + padding, cols * cell_w + padding), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        top, left = padding + r * cell_h, padding + q * cell_w
        canvas[:, top : top + h, left : left + w] = cells[i]
    grid = to_pil(canvas)
    if labels_text is not None:
        draw = ImageDraw.Draw(grid)
        font = _font()
        ink = 0 if pad_value >= 128 else 255
        fill = ink if c == 1 else (ink, ink, ink)
        for i, text in enumerate(labels_text):
            r, q = divmod(i, nrow)
            top, left = padding + r * cell_h + h + 1, padding + q * cell_w
            draw.text((left, top), _fit(draw, text, font, w), fill=fill, font=font)
    return grid


def _fit(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> str:
    """Cut ``text`` until it fits ``width`` pixels (labels never spill into the next cell)."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text
