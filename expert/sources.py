"""Where images come from: the data-source registry that ``build_dataset`` dispatches through.

Each source is one function ``load(cfg: DataConfig) -> ImageDataset`` registered in ``SOURCES`` with its
help text, so ``data.source``'s choices, ``--help`` and the errors all read this one list. A source
returns uint8 images at ``cfg.channels`` x ``cfg.image_size`` squared, int64 labels, stable source ids
(the record's position in the source, kept when other records are skipped), the class names and count
(``num_classes = 0`` and ``class_names = None`` when the source has no labels), and ``skipped``: the
records that could not be decoded (counted in the curate report).

This module imports no torch (``ddm --help`` reads the choices); the loaders import their readers
when called. To add a source: one decorated function here and its test (docs/data.md).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ddm.core.registry import Registry

if TYPE_CHECKING:
    from ddm.expert.config import DataConfig
    from ddm.expert.data import ImageDataset

__all__ = ["SOURCES", "expand_braces"]

SOURCES: Registry[Any] = Registry("data source")


@SOURCES.register("fashion-mnist", help="Debian's Fashion-MNIST idx files (28x28 grey, 10 classes)")
def fashion_mnist(cfg: DataConfig) -> ImageDataset:
    from ddm.expert.data import load_fashion_mnist  # its shape is checked by build_dataset

    return load_fashion_mnist(cfg.path, split=cfg.split, limit=cfg.limit)


@SOURCES.register(
    "image-folder", help="a folder with one sub-folder of images per class (.png/.jpg/.jpeg/.webp/.bmp)"
)
def image_folder(cfg: DataConfig) -> ImageDataset:
    from ddm.expert.data import load_image_folder

    return load_image_folder(cfg.path, image_size=cfg.image_size, channels=cfg.channels, limit=cfg.limit)


@SOURCES.register(
    "unlabelled-folder",
    help="a folder of images without classes (sub-folders are read too): unconditional experts and router",
)
def unlabelled_folder(cfg: DataConfig) -> ImageDataset:
    from ddm.expert.data import load_unlabelled_folder

    return load_unlabelled_folder(cfg.path, image_size=cfg.image_size, channels=cfg.channels, limit=cfg.limit)


@SOURCES.register(
    "webdataset",
    help="webdataset tar shards of NAME.jpg|png + NAME.cls|json, brace-expanded URLs (shards-{000..009}.tar)",
)
def webdataset(cfg: DataConfig) -> ImageDataset:
    from ddm.expert.archives import load_webdataset

    return load_webdataset(cfg)


@SOURCES.register("parquet", help="parquet files of image bytes and a label column (a Hugging Face export)")
def parquet(cfg: DataConfig) -> ImageDataset:
    from ddm.expert.archives import load_parquet

    return load_parquet(cfg)


@SOURCES.register("shards", help="partition shards written by the partition stage (ddm.expert.shards)")
def shards(cfg: DataConfig) -> ImageDataset:
    from ddm.expert.shards import read_shards

    return read_shards(cfg.path, limit=cfg.limit)


# ---------------------------------------------------------------------------------------------------
# brace expansion (webdataset's URL syntax)

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` (inclusive numeric ranges, zero-padded to the first bound's width) and
    ``{a,b,c}`` (alternatives) in ``pattern``, left to right, as webdataset and the shell do.

    ``"s-{00..02}.tar"`` -> ``["s-00.tar", "s-01.tar", "s-02.tar"]``. A pattern with no braces is
    itself. An empty or backwards range is a ValueError naming it.
    """
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(
                f"{pattern!r}: unbalanced brace; write ranges as {{000..009}} and lists as {{a,b}}"
            )
        return [pattern]
    body = match.group(1)
    rng = _RANGE.match(body)
    if rng:
        lo_text, hi_text = rng.groups()
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(
                f"{pattern!r}: the range {{{body}}} runs backwards; write {{{hi_text}..{lo_text}}}"
            )
        width = len(lo_text.lstrip("-")) if lo_text.lstrip("-").startswith("0") else 0
        items = [str(i).zfill(width) if i >= 0 else str(i) for i in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(
            f"{pattern!r}: {{{body}}} is neither a range {{000..009}} nor a list {{a,b}}; "
            "use one of those or no braces"
        )
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [out for item in items for out in expand_braces(head + item + tail)]
