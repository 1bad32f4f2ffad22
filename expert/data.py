"""Datasets for the expert trainer: Fashion-MNIST (Debian's idx files), image folders, partition shards.

``build_dataset`` makes every source one in-memory ``ImageDataset`` of uint8 images with int64 labels and
stable source ids (what curation and evaluation want); ``build_training_dataset`` is what the trainers
use: the same, except that partition shards are streamed (``ddm.expert.stream``), never read whole. Keeping uint8 in memory is 4x smaller than float and lets the shards, the router trainer and the
trainer share one representation; batches are converted to the model range [-1, 1] only when drawn.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ddm.core import storage
from ddm.expert.config import DataConfig
from ddm.expert.images import decode_image, image_shape_of, to_model_range, to_uint8

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "DataError",
    "DatasetNotFoundError",
    "ImageDataset",
    "build_dataset",
    "check_num_classes",
    "build_training_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "load_unlabelled_folder",
    "read_idx",
    "parse_idx",
    "to_model_range",
    "to_uint8",
]

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "or download the four *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist "
    "and point data.path at their directory"
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """Data that cannot be used; the message names the file or folder and what is wrong."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset is not where the config says; the message says how to get it."""


# ---------------------------------------------------------------------------------------------------
# the dataset


@dataclass(repr=False, eq=False)
class ImageDataset(Dataset):
    """Images in memory: uint8 (N, C, H, W), labels int64 (N,), source ids int64 (N,).

    Unlabelled data has ``num_classes = 0``, ``class_names = None`` and every label 0: the null class
    (index ``num_classes``), so models trained on it are unconditional.

    ``ids`` are the examples' indices in their source (the Fashion-MNIST split, the sorted file list of
    an image folder), kept through subsets and shards, so a partition can always be traced back.
    """

    in_memory = True  # the trainers index it in their own process (``ddm.core.loader``)

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    ids: torch.Tensor  # int64 (N,)
    num_classes: int
    class_names: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # records that could not be decoded (any source)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. a shard index's meta (cluster id)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        n = self.images.shape[0]
        for name in ("labels", "ids"):
            t = getattr(self, name)
            if t.dtype != torch.int64 or tuple(t.shape) != (n,):
                raise DataError(
                    f"{name} must be int64 ({n},) to match the images, got {t.dtype} {tuple(t.shape)}"
                )
        if self.num_classes < 0:
            raise DataError(f"num_classes must be >= 0 (0: unlabelled), got {self.num_classes}")
        if self.num_classes == 0:  # unlabelled: every label is the null class, index num_classes = 0
            if n and bool((self.labels != 0).any()):
                raise DataError("unlabelled data (num_classes = 0) must have every label 0, the null class")
        elif n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise DataError(
                f"labels must lie in [0, {self.num_classes}), got [{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DataError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float (C, H, W) in [-1, 1], label int64 scalar)."""
        return to_model_range(self.images[i]), self.labels[i]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float (B, C, H, W) in [-1, 1], y int64 (B,)) for integer indices (B,)."""
        images, labels = self.batch_uint8(index)
        return to_model_range(images), labels  # (B, C, H, W), (B,)

    def batch_uint8(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x uint8 (B, C, H, W), y int64 (B,)): what trainers send to the device before converting."""
        index = self._index(index)
        return self.images[index], self.labels[index]

    def subset(self, index: torch.Tensor | list[int] | slice | np.ndarray) -> ImageDataset:
        """A new dataset of the selected examples (ids, class names and meta carried over)."""
        if not isinstance(index, slice):
            index = self._index(index)
        return ImageDataset(
            images=self.images[index],
            labels=self.labels[index],
            ids=self.ids[index],
            num_classes=self.num_classes,
            class_names=self.class_names,
            skipped=list(self.skipped),
            meta=dict(self.meta),
        )

    def _index(self, index: torch.Tensor | list[int] | np.ndarray) -> torch.Tensor:
        """1-D int64 positions; a boolean mask of length N selects where it is True."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if tuple(index.shape) != (len(self),):
                raise DataError(f"boolean index must have shape ({len(self)},), got {tuple(index.shape)}")
            return index.nonzero().squeeze(1)  # (B,)
        if index.dim() != 1 or index.is_floating_point():
            raise DataError(
                f"index must be 1-D integers or a boolean mask, got {index.dtype} {tuple(index.shape)}"
            )
        return index.to(torch.long)  # (B,)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(n={len(self)}, image_shape={self.image_shape}, num_classes={self.num_classes}, "
            f"skipped={len(self.skipped)})"
        )


def check_num_classes(data_classes: int, model_classes: int, *, source: str, field: str) -> None:
    """The model's label space must hold the data's: labelled data needs ``field`` >= its classes;
    unlabelled data (0 classes) an unconditional model (``field`` = 0), whose only label is the null 0."""
    if data_classes == 0 and model_classes != 0:
        raise ValueError(
            f"the data from {source} is unlabelled (0 classes) but {field} is {model_classes}; "
            f"set {field} = 0 for an unconditional model"
        )
    if data_classes > model_classes:
        raise ValueError(
            f"the data from {source} has {data_classes} classes but {field} is {model_classes}; "
            f"set {field} = {data_classes}"
        )


def build_dataset(cfg: DataConfig) -> ImageDataset:
    """The dataset a ``[data]`` config describes (``data.source`` names a ``ddm.expert.sources.SOURCES``
    entry), checked against its ``channels`` and ``image_size``."""
    from ddm.expert.sources import SOURCES

    ds = SOURCES.get(cfg.source, field="data.source")(cfg)
    _check_shape(cfg, ds.image_shape)
    return ds


def build_training_dataset(cfg: DataConfig) -> Any:
    """The dataset a trainer reads: ``build_dataset``'s, except that shards are a ``StreamedDataset``
    (same batches, read lazily shard by shard), so memory does not grow with the partition."""
    if cfg.source != "shards":
        return build_dataset(cfg)
    from ddm.expert.stream import open_shards  # stream imports this module (via shards)

    ds = open_shards(cfg.path, limit=cfg.limit)
    latent = ds.meta.get("latent")  # a latent partition: data.* describe the pixels it was encoded from
    _check_shape(cfg, tuple(latent["image_shape"]) if latent else ds.image_shape)
    return ds


def _check_shape(cfg: DataConfig, shape: tuple[int, int, int]) -> None:
    """A fixed-shape source (Fashion-MNIST, shards) against the shape its config states, if any."""
    c, h, _ = shape
    bad = [f"data.{k} = {v} (the data's is {d})" for k, v, d in (("channels", cfg.channels, c), ("image_size", cfg.image_size, h)) if v is not None and v != d]  # fmt: skip
    if bad:
        raise DataError(
            f"{cfg.path}: data.source = {cfg.source!r} holds images of shape {list(shape)}, but the config sets "
            f"{' and '.join(bad)}; set data.channels = {c} and data.image_size = {h}, or leave both out to take "
            "them from the data"
        )


# ---------------------------------------------------------------------------------------------------
# idx files (the MNIST / Fashion-MNIST container)

# third byte of the magic number -> element type; all multi-byte values are big-endian
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(url: str) -> np.ndarray:
    """Read an idx file (gzip-compressed or plain, detected from its bytes) from any fsspec URL."""
    raw = storage.read_bytes(url)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(
                f"{url}: corrupt or truncated gzip data ({e}); re-download or reinstall the file"
            ) from None
    return parse_idx(raw, url)


def parse_idx(raw: bytes, name: str = "<idx>") -> np.ndarray:
    """Parse uncompressed idx bytes: magic (0, 0, type, ndim), ndim big-endian uint32 dims, then data."""
    if len(raw) < 4:
        raise DataError(f"{name}: {len(raw)} bytes is too short for an idx header; the file is truncated")
    zero1, zero2, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES:
        raise DataError(
            f"{name}: bad idx magic number {raw[:4].hex()} (expected 0000 then a type byte in "
            f"{sorted(hex(k) for k in _IDX_DTYPES)} and the number of dimensions); not an idx file"
        )
    if ndim == 0:
        raise DataError(f"{name}: idx header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{name}: truncated idx header ({len(raw)} bytes, {ndim} dimensions need {header_len})"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual < expected:
        raise DataError(
            f"{name}: truncated: header says {dims} ({expected} data bytes) but only {actual} follow"
        )
    if actual > expected:
        raise DataError(
            f"{name}: {actual - expected} unexpected bytes after the {dims} array; the file is corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return data.reshape(dims).astype(dtype.newbyteorder("="))  # native byte order, writable copy


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST


def fashion_mnist_file(path: str, split: str, kind: str) -> str:
    """The URL of one Fashion-MNIST file: ``kind`` is 'images-idx3' or 'labels-idx1'; gzip preferred."""
    if split not in ("train", "test"):
        raise DataError(f"data.split must be 'train' or 'test', got {split!r}")
    stem = storage.join(path, f"{'train' if split == 'train' else 't10k'}-{kind}-ubyte")
    for candidate in (stem + ".gz", stem):
        if storage.exists(candidate):
            return candidate
    raise DatasetNotFoundError(
        f"{path}: Fashion-MNIST file {stem.rsplit('/', 1)[-1]}[.gz] not found; {FASHION_MNIST_INSTALL_HINT}"
    )


def load_fashion_mnist(
    path: str = FASHION_MNIST_DIR, *, split: str = "train", limit: int | None = None
) -> ImageDataset:
    """Fashion-MNIST from idx files: 60,000 train or 10,000 test images, uint8 (N, 1, 28, 28), 10 classes."""
    if not storage.exists(path):
        raise DatasetNotFoundError(f"{path}: Fashion-MNIST directory not found; {FASHION_MNIST_INSTALL_HINT}")
    images_url = fashion_mnist_file(path, split, "images-idx3")
    labels_url = fashion_mnist_file(path, split, "labels-idx1")
    images = read_idx(images_url)
    labels = read_idx(labels_url)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{images_url}: expected uint8 images (N, H, W), got {images.dtype} {list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_url}: expected uint8 labels (N,), got {labels.dtype} {list(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_url} has {images.shape[0]} images but {labels_url} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"{labels_url}: label {int(labels.max())} is out of range for {len(FASHION_MNIST_CLASSES)} classes"
        )
    n = images.shape[0] if limit is None else min(limit, images.shape[0])
    return ImageDataset(
        images=torch.from_numpy(images[:n].copy()).unsqueeze(1),  # (n, 1, 28, 28)
        labels=torch.from_numpy(labels[:n].astype(np.int64)),  # (n,)
        ids=torch.arange(n, dtype=torch.int64),  # (n,)
        num_classes=len(FASHION_MNIST_CLASSES),
        class_names=list(FASHION_MNIST_CLASSES),
    )


# ---------------------------------------------------------------------------------------------------
# image folders: root/<class_name>/<image>


def list_image_folder(url: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names sorted, [(file URL, label)] sorted by class then file name) for an image folder.

    File URLs are ``url`` joined with ``<class>/<file>``, so they read like the configured path
    (``memory://x/cat/a.png``, ``s3://b/x/cat/a.png``) in logs and ``skipped``.
    """
    fs, root = storage.filesystem(url)
    if not fs.exists(root):
        raise DatasetNotFoundError(
            f"{url}: image folder not found; data.path must be a folder with one sub-folder per class"
        )
    classes = sorted(
        _basename(e["name"])
        for e in fs.ls(root, detail=True)
        if e["type"] == "directory" and not _basename(e["name"]).startswith(".")
    )
    if not classes:
        raise DataError(
            f"{url}: no class sub-folders; expected {url}/<class_name>/<image>.png (or .jpg/.jpeg/.webp/.bmp)"
        )
    files: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_url = storage.join(url, name)
        _, class_path = storage.filesystem(class_url)
        images = sorted(
            _basename(e["name"])
            for e in fs.ls(class_path, detail=True)
            if e["type"] == "file" and e["name"].lower().endswith(IMAGE_EXTENSIONS)
        )
        files.extend((storage.join(class_url, f), label) for f in images)
    if not files:
        raise DataError(
            f"{url}: the class folders {classes} hold no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    return classes, files


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def load_image_folder(
    url: str, *, image_size: int | None = None, channels: int | None = None, limit: int | None = None
) -> ImageDataset:
    """Decode every image under ``url``/<class>/, center-cropped and resized to ``image_size`` squares.

    Labels are the class sub-folders' indices in sorted order. ``image_size`` / ``channels`` left out
    (``None``) come from the first image that decodes (its shorter side; 1 if it is grey, else 3), and
    every other image is cropped, resized and converted to that; how many needed it is logged.

    Files that fail to decode are skipped and listed in ``skipped`` (and logged), so one bad JPEG in a
    scraped folder does not stop a run but is never hidden either. ``ids`` index the sorted list of all
    candidate files, so they stay stable when some files are skipped.
    """
    classes, files = list_image_folder(url)
    records = ((file_url, lambda u=file_url: storage.read_bytes(u), label) for file_url, label in files)
    return decode_records(url, records, image_size=image_size, channels=channels, limit=limit,
                          num_classes=len(classes), class_names=classes)  # fmt: skip


def list_unlabelled_folder(url: str) -> list[str]:
    """Every image file under ``url`` (sub-folders included, hidden ones not), sorted by path."""
    fs, root = storage.filesystem(url)
    if not fs.exists(root):
        raise DatasetNotFoundError(f"{url}: image folder not found; data.path must be a folder of images")
    base = root.rstrip("/") + "/"
    found = sorted(
        p[len(base) :]
        for p in fs.find(root)
        if p.startswith(base)
        and p.lower().endswith(IMAGE_EXTENSIONS)
        and not any(part.startswith(".") for part in p[len(base) :].split("/"))
    )
    if not found:
        raise DataError(f"{url}: no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)} under it")
    return [storage.join(url, rel) for rel in found]


def load_unlabelled_folder(
    url: str, *, image_size: int | None = None, channels: int | None = None, limit: int | None = None
) -> ImageDataset:
    """Every image under ``url`` as unlabelled data (``num_classes = 0``: unconditional experts and router),
    decoded and validated as ``load_image_folder`` does; ``ids`` index the sorted file list."""
    files = list_unlabelled_folder(url)
    records = ((u, lambda u=u: storage.read_bytes(u), 0) for u in files)
    return decode_records(url, records, image_size=image_size, channels=channels, limit=limit,
                          num_classes=0, class_names=None)  # fmt: skip


def decode_records(
    url: str,
    records: Iterable[tuple[str, Callable[[], bytes], int]],
    *,
    image_size: int | None,
    channels: int | None,
    limit: int | None,
    num_classes: int | None,
    class_names: list[str] | None,
    meta: dict[str, Any] | None = None,
) -> ImageDataset:
    """Decode ``(name, read, label)`` records in order into one dataset: every source's validation.

    ``read()`` gives the record's encoded image bytes; storage errors propagate (they are not the
    record's fault). A record whose bytes do not decode is skipped, named in ``skipped`` and logged; a
    source where nothing decodes is an error. ``ids`` are record positions, stable under skipping.
    ``num_classes=None``: one more than the largest label decoded.
    """
    images: list[torch.Tensor] = []
    labels: list[int] = []
    ids: list[int] = []
    skipped: list[str] = []
    inferred = image_size is None or channels is None
    differ = 0  # images whose own shape is not the inferred one
    for source_id, (name, read, label) in enumerate(records):
        if limit is not None and len(images) >= limit:
            break
        data = read()  # storage errors are not the record's fault: let them raise
        try:
            if inferred:
                own = image_shape_of(data)
                if channels is None or image_size is None:
                    channels, image_size = channels or own[0], image_size or own[1]
                    log.info("%s: %d channel(s), %dx%d, from its first image %s", url, channels, image_size, image_size, name)  # fmt: skip
                differ += own != (channels, image_size)
            img = decode_image(data, channels=channels, size=image_size)  # (C, S, S)
        except Exception as e:  # noqa: BLE001 - PIL raises many exception types for malformed files
            skipped.append(name)
            log.debug("skipping %s: %s", name, e)
            continue
        images.append(img)
        labels.append(label)
        ids.append(source_id)
    if differ:
        log.warning("%s: %d image(s) differ from the first one's shape and were converted to %d channel(s) "
                    "at %dx%d; set data.channels / data.image_size to choose", url, differ, channels, image_size, image_size)  # fmt: skip
    if skipped:
        shown = ", ".join(skipped[:5]) + (f", ... ({len(skipped) - 5} more)" if len(skipped) > 5 else "")
        log.warning("%s: skipped %d unreadable image(s): %s", url, len(skipped), shown)
    if not images:
        raise DataError(f"{url}: none of the {len(skipped)} images could be decoded (first: {skipped[:3]})")
    return ImageDataset(
        images=torch.stack(images),  # (N, C, S, S)
        labels=torch.tensor(labels, dtype=torch.int64),  # (N,)
        ids=torch.tensor(ids, dtype=torch.int64),  # (N,)
        num_classes=max(labels) + 1 if num_classes is None else num_classes,
        class_names=class_names,
        skipped=skipped,
        meta=dict(meta or {}),
    )
