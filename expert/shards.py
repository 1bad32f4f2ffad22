"""Partition shards: how the coordinator hands one cluster's data to an expert trainer, over any fsspec URL.

Layout of one partition directory::

    index.json               {"format": "ddm-shards/1", "count": N, "image_shape": [C, H, W],
                              "num_classes": K, "shards": [{"file", "count", "sha256"}, ...], "meta": {...}}
    shard-00000.safetensors  images uint8 (n, C, H, W), labels int64 (n,), ids int64 (n,)

A latent partition (``ddm.expert.autoencoder``) holds normalized latents instead: its index adds
``"dtype": "float16"`` and ``meta.latent`` (the autoencoder, scale, shift and pixel shape), and its
``images`` are float16 (n, c, h, w). Without ``dtype`` a partition is uint8 pixels.

Every file is written atomically and ``index.json`` last, so a directory without ``index.json`` is an
unfinished partition, never a silently short one. The index's sha256 of each shard file lets a reader on
another island detect a corrupt or half-copied shard. Tensors travel as safetensors (never pickles).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddm.core import storage
from ddm.expert.data import DataError, ImageDataset

FORMAT = "ddm-shards/1"
INDEX_FILE = "index.json"
_SHARD_NAME = re.compile(r"^shard-\d{5,}\.safetensors$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TENSOR_DTYPES = {"images": torch.uint8, "labels": torch.int64, "ids": torch.int64}
IMAGE_DTYPES = {"uint8": torch.uint8, "float16": torch.float16}  # index "dtype": pixels or latents


def image_dtype(index: dict[str, Any]) -> torch.dtype:
    """The dtype of a validated index's ``images``: uint8 pixels unless it says ``"dtype": "float16"``."""
    return IMAGE_DTYPES[index.get("dtype", "uint8")]


class ShardError(DataError):
    """A partition that cannot be read as written; the message names the file and what is wrong."""


class IncompletePartitionError(ShardError, FileNotFoundError):
    """No ``index.json``: the writer never finished (it writes the index last) or the path is wrong."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_shards(
    url: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    ids: torch.Tensor,
    *,
    num_classes: int,
    shard_size: int = 10000,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a partition (images uint8 (N, C, H, W), labels (N,), ids (N,)) under ``url``; returns the index.

    Rewriting an existing partition first removes its ``index.json`` (so readers see it as incomplete
    while shards change), then writes the shards, the new index, and removes shards the new index does
    not list. ``meta`` is free-form JSON (cluster id, source, ``class_names``...). A partition too large
    for memory is written chunk by chunk with ``ShardWriter``, which this wraps.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"write_shards: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    _check_rows(images, labels, ids, num_classes)
    writer = ShardWriter(
        url, image_shape=tuple(images.shape[1:]), num_classes=num_classes, shard_size=shard_size, meta=meta
    )
    writer.add(images, labels, ids)
    return writer.close()


def _check_rows(images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor, num_classes: int) -> None:
    n = images.shape[0]
    for name, t in (("labels", labels), ("ids", ids)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or tuple(t.shape) != (n,):
            raise ValueError(
                f"write_shards: {name} must be integers of shape ({n},), got {t.dtype} {tuple(t.shape)}"
            )
    if num_classes < 0:
        raise ValueError(f"write_shards: num_classes must be >= 0 (0: unlabelled), got {num_classes}")
    rows = max(num_classes, 1)  # unlabelled data: every label is the null class, 0
    if n and (int(labels.min()) < 0 or int(labels.max()) >= rows):
        raise ValueError(
            f"write_shards: labels must lie in [0, {rows}), got [{int(labels.min())}, {int(labels.max())}]"
        )


class ShardWriter:
    """Write a partition chunk by chunk in constant memory (at most one shard buffered).

    ``add(images, labels, ids)`` any number of times, then ``close()`` writes ``index.json`` (last) and
    returns it; a writer left without ``close()`` (an error) leaves no index, i.e. an incomplete
    partition. Opening the writer removes an existing partition's index first, as ``write_shards`` does.
    """

    def __init__(
        self,
        url: str,
        *,
        image_shape: tuple[int, ...],
        num_classes: int,
        shard_size: int = 10000,
        meta: dict[str, Any] | None = None,
        dtype: str = "uint8",
    ):
        if dtype not in IMAGE_DTYPES:
            raise ValueError(f"write_shards: dtype must be one of {', '.join(IMAGE_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        if len(image_shape) != 3 or not all(int(d) > 0 for d in image_shape):
            raise ValueError(
                f"write_shards: image_shape must be (C, H, W) of positive sizes, got {tuple(image_shape)}"
            )
        if num_classes < 0:
            raise ValueError(f"write_shards: num_classes must be >= 0 (0: unlabelled), got {num_classes}")
        if shard_size < 1:
            raise ValueError(f"write_shards: shard_size must be >= 1, got {shard_size}")
        self.meta = dict(meta or {})
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"write_shards: meta must be JSON-serialisable ({e})") from None
        self.url, self.num_classes, self.shard_size = url, int(num_classes), shard_size
        self.image_shape = tuple(int(d) for d in image_shape)
        self.entries: list[dict[str, Any]] = []
        self.count = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_n = 0
        self._index_url = storage.join(url, INDEX_FILE)
        self._started = False

    def add(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        want = IMAGE_DTYPES[self.dtype]
        if images.dtype != want or images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"write_shards: images must be {self.dtype} (N, {', '.join(map(str, self.image_shape))}), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        _check_rows(images, labels, ids, self.num_classes)
        if not self._started:
            storage.remove(self._index_url)  # mark the partition incomplete while its shards change
            self._started = True
        self._pending.append((
            images.detach().cpu(), labels.detach().cpu().to(torch.int64), ids.detach().cpu().to(torch.int64)
        ))  # fmt: skip
        self._pending_n += images.shape[0]
        while self._pending_n >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        images, labels, ids = (torch.cat([p[j] for p in self._pending]) for j in range(3))
        rest = (images[n:], labels[n:], ids[n:])
        self._pending = [rest] if rest[0].shape[0] else []
        self._pending_n = rest[0].shape[0]
        i = len(self.entries)
        payload = st_save(
            {
                "images": images[:n].contiguous(),  # (n_i, C, H, W)
                "labels": labels[:n].contiguous(),  # (n_i,)
                "ids": ids[:n].contiguous(),  # (n_i,)
            },
            metadata={"format": FORMAT},
        )
        storage.write_bytes(storage.join(self.url, shard_name(i)), payload)
        self.entries.append(
            {"file": shard_name(i), "count": n, "sha256": hashlib.sha256(payload).hexdigest()}
        )
        self.count += n

    def close(self) -> dict[str, Any]:
        """Write the last (short) shard and then ``index.json``; remove shards of an earlier, larger write."""
        if not self._started:
            storage.remove(self._index_url)
            self._started = True
        if self._pending_n:
            self._flush(self._pending_n)
        index = {
            "format": FORMAT,
            "count": self.count,
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "shards": self.entries,
            "meta": self.meta,
        }
        if self.dtype != "uint8":
            index["dtype"] = self.dtype
        storage.write_json(self._index_url, index)
        listed = {e["file"] for e in self.entries}
        for name in storage.listdir(self.url):
            if _SHARD_NAME.match(name) and name not in listed:
                storage.remove(storage.join(self.url, name))  # left over from an earlier, larger write
        return index


def read_index(url: str) -> dict[str, Any]:
    """The validated ``index.json`` of the partition at ``url``."""
    index_url = storage.join(url, INDEX_FILE)
    if not storage.exists(index_url):
        shards = [n for n in storage.listdir(url) if _SHARD_NAME.match(n)]
        if shards:
            why = f"{len(shards)} shard file(s) exist but the writer never wrote the index (it writes it last); rewrite the partition"
        else:
            why = "no partition was written here; check data.path (or the run's partition stage)"
        raise IncompletePartitionError(f"{index_url}: incomplete partition: {INDEX_FILE} is missing; {why}")
    index = storage.read_json(index_url)
    _validate_index(index, index_url)
    return index


def _validate_index(index: Any, where: str) -> None:
    def bad(field: str, problem: str) -> ShardError:
        return ShardError(f"{where}: field {field!r} {problem}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(index, dict):
        raise ShardError(f"{where}: expected a JSON object, got {type(index).__name__}")
    for key in ("format", "count", "image_shape", "num_classes", "shards"):
        if key not in index:
            raise bad(key, "is missing")
    if index["format"] != FORMAT:
        raise bad("format", f"is {index['format']!r}; this reader understands {FORMAT!r}")
    if not is_int(index["count"]) or index["count"] < 0:
        raise bad("count", f"must be an integer >= 0, got {index['count']!r}")
    shape = index["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(is_int(d) and d > 0 for d in shape)):
        raise bad("image_shape", f"must be [C, H, W] of positive integers, got {shape!r}")
    if not is_int(index["num_classes"]) or index["num_classes"] < 0:
        raise bad("num_classes", f"must be an integer >= 0 (0: unlabelled), got {index['num_classes']!r}")
    if index.get("dtype", "uint8") not in IMAGE_DTYPES:
        raise bad("dtype", f"is {index['dtype']!r}; this reader understands {', '.join(IMAGE_DTYPES)}")
    if not isinstance(index.get("meta", {}), dict):
        raise bad("meta", f"must be a JSON object, got {type(index['meta']).__name__}")
    if not isinstance(index["shards"], list):
        raise bad("shards", "must be a list")
    total = 0
    for i, entry in enumerate(index["shards"]):
        if not isinstance(entry, dict):
            raise bad(f"shards[{i}]", "must be an object with file, count, sha256")
        name = entry.get("file")
        if not isinstance(name, str) or not _SHARD_NAME.match(name):
            raise bad(f"shards[{i}].file", f"must be a shard file name like {shard_name(0)!r}, got {name!r}")
        if not is_int(entry.get("count")) or entry["count"] < 0:
            raise bad(f"shards[{i}].count", f"must be an integer >= 0, got {entry.get('count')!r}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise bad(f"shards[{i}].sha256", f"must be 64 lowercase hex digits, got {entry.get('sha256')!r}")
        total += entry["count"]
    if total != index["count"]:
        raise bad("count", f"is {index['count']} but the shards' counts add up to {total}")


def read_shards(url: str, *, verify: bool = True, limit: int | None = None) -> ImageDataset:
    """Load the partition at ``url`` into memory (the first ``limit`` examples if given).

    With ``verify`` each shard's bytes are checked against the index's sha256 before they are parsed;
    counts, dtypes, shapes and label ranges are always checked. Errors name the shard and the problem.
    """
    index = read_index(url)
    if image_dtype(index) != torch.uint8:
        raise ShardError(
            f"{url}: a latent partition ({index['dtype']} latents); it is read streamed "
            "(ddm.expert.stream.open_shards), not into memory as images"
        )
    c, h, w = index["image_shape"]
    num_classes = index["num_classes"]
    want = index["count"] if limit is None else min(limit, index["count"])
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in _TENSOR_DTYPES}
    have = 0
    for entry in index["shards"]:
        if have >= want:
            break
        shard_url = storage.join(url, entry["file"])
        tensors = _read_shard(shard_url, entry, verify, image_dtype(index))
        n = entry["count"]
        if tuple(tensors["images"].shape) != (n, c, h, w):
            raise ShardError(
                f"{shard_url}: images have shape {list(tensors['images'].shape)}, the index says {[n, c, h, w]}"
            )
        for key in ("labels", "ids"):
            if tuple(tensors[key].shape) != (n,):
                raise ShardError(
                    f"{shard_url}: {key} have shape {list(tensors[key].shape)}, the index says [{n}]"
                )
        labels = tensors["labels"]
        if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ShardError(
                f"{shard_url}: labels span [{int(labels.min())}, {int(labels.max())}], outside [0, {num_classes})"
            )
        take = min(n, want - have)
        for key in parts:
            parts[key].append(tensors[key][:take])
        have += take
    meta = index.get("meta", {})
    class_names = meta.get("class_names")
    if not (
        isinstance(class_names, list)
        and len(class_names) == num_classes
        and all(isinstance(s, str) for s in class_names)
    ):
        class_names = None
    empty = {
        "images": torch.empty(0, c, h, w, dtype=torch.uint8),
        "labels": torch.empty(0, dtype=torch.int64),
    }
    return ImageDataset(
        images=torch.cat(parts["images"]) if parts["images"] else empty["images"],  # (N, C, H, W)
        labels=torch.cat(parts["labels"]) if parts["labels"] else empty["labels"],  # (N,)
        ids=torch.cat(parts["ids"]) if parts["ids"] else empty["labels"].clone(),  # (N,)
        num_classes=num_classes,
        class_names=class_names,
        meta=meta,
    )


def _read_shard(
    shard_url: str, entry: dict[str, Any], verify: bool, images_dtype: torch.dtype = torch.uint8
) -> dict[str, torch.Tensor]:
    try:
        raw = storage.read_bytes(shard_url)
    except FileNotFoundError:
        raise ShardError(
            f"{shard_url}: shard listed in {INDEX_FILE} is missing; rewrite the partition"
        ) from None
    if verify:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != entry["sha256"]:
            raise ShardError(
                f"{shard_url}: checksum mismatch (sha256 {digest[:16]}... but {INDEX_FILE} says {entry['sha256'][:16]}...); "
                "the shard is corrupt or was partly copied; rewrite the partition"
            )
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ShardError(f"{shard_url}: not a readable safetensors file ({e})") from None
    for key, dtype in {**_TENSOR_DTYPES, "images": images_dtype}.items():
        if key not in tensors:
            raise ShardError(f"{shard_url}: tensor {key!r} is missing (has {sorted(tensors)})")
        if tensors[key].dtype != dtype:
            raise ShardError(f"{shard_url}: tensor {key!r} is {tensors[key].dtype}, expected {dtype}")
    return tensors
