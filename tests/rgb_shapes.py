"""A generated RGB dataset with real structure: coloured shapes drawn with Pillow, one class per shape.

Each image is a filled shape (circle, square, triangle, cross) of a random saturated colour, size and
position on a light background of another colour, so classes differ in form and clusters can form on
colour: what an RGB run has to learn, unlike noise. The writers lay the same images out as each source
expects (class folders, webdataset tar shards, parquet as Hugging Face exports it).
"""

from __future__ import annotations

import colorsys
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")


def _colour(rng: np.random.Generator, light: bool) -> tuple[int, int, int]:
    h = float(rng.random())
    s, v = (0.15, 0.95) if light else (0.9, 0.85)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB picture (size x size) of ``shape``."""
    im = Image.new("RGB", (size, size), _colour(rng, light=True))
    d = ImageDraw.Draw(im)
    r = size * float(rng.uniform(0.22, 0.36))
    cx, cy = (size / 2 + float(rng.uniform(-0.12, 0.12)) * size for _ in range(2))
    fill = _colour(rng, light=False)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 2.5
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return im


def shapes(
    n: int, size: int = 32, seed: int = 0, classes: int = len(SHAPES)
) -> list[tuple[Image.Image, int]]:
    """``n`` (picture, label) pairs, labels cycling over the first ``classes`` shapes."""
    rng = np.random.default_rng(seed)
    return [(draw_shape(SHAPES[i % classes], size, rng), i % classes) for i in range(n)]


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def write_folder(root: Path, items: list[tuple[Image.Image, int]], *, labelled: bool = True) -> Path:
    """root/<shape>/NNNN.png (labelled) or root/NNNN.png (unlabelled)."""
    for i, (im, label) in enumerate(items):
        folder = root / SHAPES[label] if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:04d}.png")
    return root


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def webdataset_members(items: list[tuple[Image.Image, int]], start: int = 0, label: str = "cls"):
    """Members of one shard: NNNNNN.jpg (odd) / .png (even) with NNNNNN.cls or NNNNNN.json."""
    out: list[tuple[str, bytes]] = []
    for i, (im, y) in enumerate(items, start):
        key = f"sample{i:06d}"
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        out.append((f"{key}.{ext}", encode(im, fmt)))
        if label == "cls":
            out.append((f"{key}.cls", str(y).encode()))
        elif label == "json":
            out.append((f"{key}.json", json.dumps({"label": y, "caption": SHAPES[y]}).encode()))
    return out


def parquet_bytes(items: list[tuple[Image.Image, int]], *, struct: bool = True, names: bool = True) -> bytes:
    """A parquet file as a Hugging Face ``datasets`` export writes it: ``image`` {bytes, path} (or plain
    binary), ``label`` int64, and the ClassLabel names in the schema's 'huggingface' metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [encode(im) for im, _ in items]
    image = (
        pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(data)],
                 type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        if struct else pa.array(data, type=pa.binary())
    )  # fmt: skip
    table = pa.table({"image": image, "label": pa.array([y for _, y in items], type=pa.int64())})
    if names:
        hf = {"info": {"features": {"image": {"_type": "Image"},
                                    "label": {"_type": "ClassLabel", "names": list(SHAPES)}}}}  # fmt: skip
        table = table.replace_schema_metadata({"huggingface": json.dumps(hf)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=16)
    return buf.getvalue()
