"""Image conversions, decoding and grids (expert/images.py)."""

from __future__ import annotations

import io
import uuid

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from ddm.core import storage
from ddm.expert.images import (
    decode_image,
    make_grid,
    png_bytes,
    save_grid,
    save_png,
    to_model_range,
    to_pil,
    to_uint8,
)


def test_uint8_round_trip_is_exact_for_all_levels():
    levels = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(levels)
    assert x.dtype == torch.float32
    assert x[0].item() == -1.0 and x[-1].item() == 1.0
    assert torch.equal(to_uint8(x), levels)


def test_to_uint8_clamps_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0, 1 / 127.5 * 0.49 - 1.0, 1 / 127.5 * 0.51 - 1.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255, 0, 1]  # 0.0 -> 127.5 rounds half to even -> 128


def test_conversions_reject_the_wrong_dtype():
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(torch.zeros(3))
    with pytest.raises(ValueError, match="float"):
        to_uint8(torch.zeros(3, dtype=torch.uint8))


def _pixels(im: Image.Image) -> torch.Tensor:
    """(H, W) or (H, W, 3) uint8 pixels of a PIL image."""
    return torch.from_numpy(np.array(im))


def _png(im: Image.Image) -> bytes:
    return png_bytes(im)


def test_decode_center_crops_before_resizing():
    # 60x20: only the center 20x20 square is white, so after the crop the whole image is white
    im = Image.new("L", (60, 20), 0)
    im.paste(255, (20, 0, 40, 20))
    out = decode_image(_png(im), channels=1, size=8)
    assert out.shape == (1, 8, 8) and out.dtype == torch.uint8
    assert torch.all(out == 255)
    # portrait works the same way
    out = decode_image(_png(im.transpose(Image.Transpose.ROTATE_90)), channels=1, size=8)
    assert torch.all(out == 255)


def test_decode_converts_to_grey_or_rgb():
    red = _png(Image.new("RGB", (10, 10), (255, 0, 0)))
    rgb = decode_image(red, channels=3, size=10)
    assert rgb.shape == (3, 10, 10)
    assert rgb[:, 0, 0].tolist() == [255, 0, 0]
    grey = decode_image(red, channels=1, size=10)
    assert grey.shape == (1, 10, 10)
    assert int(grey[0, 0, 0]) == 76  # ITU-R 601 luma: 255 * 299/1000
    # a grey image becomes three equal channels
    g = decode_image(_png(Image.new("L", (10, 10), 200)), channels=3, size=10)
    assert torch.all(g == 200)


def test_decode_puts_transparent_pixels_on_white():
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    assert torch.all(decode_image(_png(im), channels=1, size=4) == 255)


def test_decode_rejects_garbage():
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        decode_image(b"not an image", channels=1, size=8)


def _distinct_images(n: int, c: int, h: int, w: int) -> torch.Tensor:
    # every image has its own constant level, so each cell of a grid is identifiable
    return (torch.arange(n, dtype=torch.uint8) * 10 + 5).view(n, 1, 1, 1).expand(n, c, h, w).contiguous()


def test_make_grid_layout_closed_form():
    images = _distinct_images(10, 1, 28, 28)
    grid = make_grid(images, nrow=4, padding=2, pad_value=255, scale=2)
    assert grid.mode == "L"
    # cols = 4, rows = ceil(10 / 4) = 3, cell = 56 px + 2 padding
    assert grid.size == (4 * 58 + 2, 3 * 58 + 2)
    px = _pixels(grid)  # (H, W)
    for i in range(10):
        r, q = divmod(i, 4)
        top, left = 2 + r * 58, 2 + q * 58
        cell = px[top : top + 56, left : left + 56]
        assert torch.all(cell == 10 * i + 5), f"cell {i}"
    assert torch.all(px[:2, :] == 255) and torch.all(px[:, :2] == 255)  # outer padding
    assert torch.all(px[2 + 2 * 58 :, 2 + 2 * 58 :] == 255)  # the two empty slots of the last row


def test_make_grid_rgb_float_and_nearest_upscale():
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    grid_float = make_grid(x, nrow=3, padding=0, scale=3)
    grid_uint8 = make_grid(to_uint8(x), nrow=3, padding=0, scale=3)
    assert grid_float.mode == "RGB" and grid_float.size == (36, 12)
    assert torch.equal(_pixels(grid_float), _pixels(grid_uint8))
    # nearest-neighbour: each source pixel becomes a 3x3 block
    img0 = to_uint8(x[0])
    assert grid_uint8.getpixel((4, 7)) == tuple(img0[:, 7 // 3, 4 // 3].tolist())


def test_make_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="zero images"):
        make_grid(torch.zeros(0, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        make_grid(torch.zeros(2, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="nrow"):
        make_grid(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), nrow=0)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_save_grid_writes_a_png(tmp_path, where):
    url = (
        str(tmp_path / "out" / "grid.png")
        if where == "local"
        else f"memory://grids-{uuid.uuid4().hex}/grid.png"
    )
    images = _distinct_images(6, 1, 28, 28)
    returned = save_grid(images, url, nrow=3)
    with Image.open(io.BytesIO(storage.read_bytes(url))) as im:
        assert im.format == "PNG"
        # default scale upscales 28 px to 56 px
        assert im.size == (3 * 58 + 2, 2 * 58 + 2) == returned.size
        assert torch.equal(_pixels(im), _pixels(make_grid(images, nrow=3, scale=2)))
    if where == "memory":
        fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


def test_save_grid_with_labels_adds_a_text_strip(tmp_path):
    images = _distinct_images(4, 1, 28, 28)
    plain = make_grid(images, nrow=2, scale=2)
    url = str(tmp_path / "labelled.png")
    grid = save_grid(
        images, url, nrow=2, labels=torch.tensor([0, 1, 2, 3]), label_names=["a", "b", "c", "Ankle boot"]
    )
    assert grid.size[0] == plain.size[0] and grid.size[1] > plain.size[1]
    strip_top = 2 + 56
    strip = _pixels(grid.crop((2, strip_top, 58, strip_top + 10)))
    assert (strip < 128).any(), "label text should be drawn under the first cell"
    with pytest.raises(ValueError, match="labels"):
        save_grid(images, url, labels=[0, 1])


def test_save_png_from_tensor(tmp_path):
    img = _distinct_images(1, 3, 5, 7)[0]
    url = save_png(img, str(tmp_path / "one.png"))
    with Image.open(url) as im:
        assert im.mode == "RGB" and im.size == (7, 5)
        assert im.getpixel((0, 0)) == (5, 5, 5)
    assert to_pil(img).size == (7, 5)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic write left no temp file
