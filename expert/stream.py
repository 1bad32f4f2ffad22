"""Streamed partitions: a map-style dataset over shards that are read lazily, row by row, never whole.

``open_shards(url)`` (one partition) and ``open_partitions(urls)`` (the router's and the student's union of
all partitions) return a ``StreamedDataset``: global index -> (shard, row) through the index's counts,
so opening reads only ``index.json``. A shard is *opened* the first time a batch asks for one of its rows:

* **local files** are verified against the index's sha256 once per job (streamed through hashlib, so the
  check costs no memory; a flag in shared memory tells the DataLoader workers a shard is already
  checked, and a lock on the file makes concurrent workers hash it once), then its safetensors header is
  parsed and checked against the index (dtypes, shapes, label range), and its labels and ids (16 bytes
  per example) are kept. Image rows are then read with ``os.preadv`` straight into the batch, so neither
  the file nor the page cache is mapped into the process: resident memory does not grow with the
  partition (a memory map would count every touched page in the RSS).
* **remote URLs** (``s3://``, any non-local fsspec URL) are copied on first use into a local cache,
  ``$DDM_SHARD_CACHE`` (default ``~/.cache/ddm/shards``), named by their sha256 and hashed while they
  download: a copy becomes visible (atomic rename) only once it matched the index, so a cached file is
  trusted without rehashing, across jobs too, and a changed shard (new sha256) is never served stale.
  Workers that want the same shard wait on one lock file, so each shard is downloaded once. Reading by
  HTTP ranges instead would save the local disk but cannot verify the checksum without reading the
  whole shard anyway, and pays a round trip per batch; the cache is not evicted (size it to the
  partitions a machine trains on, or clear it between runs).

Errors are the shard reader's ``ShardError``s with the same messages as ``read_shards`` (which still loads
a partition whole, for the stages that want the images in memory: curation, evaluation). Batches come out
bit-identical to ``read_shards(url).batch_uint8(index)``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ddm.core import storage
from ddm.expert.images import to_model_input
from ddm.expert.shards import INDEX_FILE, ShardError, image_dtype, read_index

CACHE_ENV = "DDM_SHARD_CACHE"
_HEADER_MAX = 100 * 2**20  # a safetensors header larger than this is not one of ours
_CHUNK = 8 * 2**20
MAX_OPEN = 256  # open shard files per process; the least recently used is closed (reopening is cheap)
_ST_DTYPES = {"images": ("U8", 1), "labels": ("I64", 8), "ids": ("I64", 8)}
_IMAGE_ST = {"uint8": ("U8", 1, np.uint8), "float16": ("F16", 2, np.float16)}  # index dtype -> header, numpy


def cache_dir() -> Path:
    """Where remote shards are cached: ``$DDM_SHARD_CACHE`` or ``~/.cache/ddm/shards``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddm" / "shards")


@dataclass(frozen=True)
class _Shard:
    url: str  # the shard's URL, for messages
    entry: dict[str, Any]  # its index entry: file, count, sha256
    rows: int  # rows used (the entry's count, or fewer under a limit)
    num_classes: int
    image_shape: tuple[int, int, int]
    dtype: str = "uint8"  # of the images: uint8 pixels or float16 latents (the index's "dtype")


class _OpenShard:
    """One opened shard in one process: a file descriptor, where the image bytes start, labels and ids."""

    def __init__(self, fd: int, images_at: int, row_bytes: int, labels: torch.Tensor, ids: torch.Tensor):
        self.fd, self.images_at, self.row_bytes, self.labels, self.ids = fd, images_at, row_bytes, labels, ids


class _ShardSet:
    """The shards behind a ``StreamedDataset`` (shared by its subsets): where each starts in the global
    index, which are verified (shared memory, seen by DataLoader workers), and this process's open ones."""

    def __init__(self, shards: list[_Shard], verify: bool):
        self.shards, self.verify = shards, verify
        counts = torch.tensor([s.rows for s in shards], dtype=torch.int64)
        self.starts = torch.cumsum(counts, 0) - counts  # (S,) first global position of each shard
        self.total = int(counts.sum())
        self.verified = torch.zeros(len(shards), dtype=torch.uint8).share_memory_()  # (S,) 1 = checked
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()  # least recently used first
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers (spawn) reopen their own files
        return {**self.__dict__, "_open": OrderedDict()}

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):  # interpreter shutdown, or a half-built set
            pass

    def opened(self) -> list[int]:
        """The shards this process holds open (tests: laziness)."""
        return sorted(self._open) if self._pid == os.getpid() else []

    def close(self) -> None:
        if self._pid == os.getpid():
            for shard in self._open.values():
                os.close(shard.fd)
        self._open = OrderedDict()

    def shard(self, i: int) -> _OpenShard:
        if self._pid != os.getpid():  # a forked worker: close its copies of the parent's descriptors
            for shard in self._open.values():
                os.close(shard.fd)
            self._open, self._pid = OrderedDict(), os.getpid()
        got = self._open.get(i)
        if got is None:
            got = self._open[i] = self._open_shard(i)
            if len(self._open) > MAX_OPEN:  # bound the descriptors of a partition of many small shards
                os.close(self._open.popitem(last=False)[1].fd)
        else:
            self._open.move_to_end(i)
        return got

    def locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shard (B,), row in shard (B,)) of global positions (B,)."""
        shard = torch.searchsorted(self.starts, positions, right=True) - 1  # (B,)
        return shard, positions - self.starts[shard]

    # --- opening one shard --------------------------------------------------------------------------

    def _local_path(self, i: int) -> str:
        s = self.shards[i]
        if storage.is_local(s.url):
            return storage.filesystem(s.url)[1]
        return str(_cached_copy(s.url, s.entry["sha256"]))  # verified while it downloaded

    def _open_shard(self, i: int) -> _OpenShard:
        s = self.shards[i]
        path = self._local_path(i)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError(
                f"{s.url}: shard listed in {INDEX_FILE} is missing; rewrite the partition"
            ) from None
        try:
            if self.verify and storage.is_local(s.url) and not self.verified[i]:
                fcntl.flock(fd, fcntl.LOCK_EX)  # one worker hashes; the others wait, then see the flag
                try:
                    if not self.verified[i]:
                        _check_digest(fd, s)
                        self.verified[i] = 1
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            return _parse(fd, s)
        except BaseException:
            os.close(fd)
            raise


def _check_digest(fd: int, s: _Shard) -> None:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    _compare_digest(h.hexdigest(), s)


def _compare_digest(digest: str, s: _Shard) -> None:
    if digest != s.entry["sha256"]:
        raise ShardError(
            f"{s.url}: checksum mismatch (sha256 {digest[:16]}... but {INDEX_FILE} says {s.entry['sha256'][:16]}...); "
            "the shard is corrupt or was partly copied; rewrite the partition"
        )


def _parse(fd: int, s: _Shard) -> _OpenShard:
    """Check a shard's safetensors header against the index; read its labels and ids."""
    size = os.fstat(fd).st_size

    def unreadable(why: str) -> ShardError:
        return ShardError(f"{s.url}: not a readable safetensors file ({why})")

    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise unreadable(f"{size} bytes is too short for a header")
    n = int.from_bytes(head, "little")
    if n > min(_HEADER_MAX, size - 8):
        raise unreadable(f"header length {n} does not fit the {size}-byte file")
    try:
        header = json.loads(os.pread(fd, n, 8))
    except (UnicodeDecodeError, ValueError) as e:
        raise unreadable(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise unreadable("header is not a JSON object")
    base = 8 + n
    at: dict[str, int] = {}
    st_dtypes = {**_ST_DTYPES, "images": _IMAGE_ST[s.dtype][:2]}
    for key, (dtype, itemsize) in st_dtypes.items():
        info = header.get(key)
        if not isinstance(info, dict):
            raise ShardError(
                f"{s.url}: tensor {key!r} is missing (has {sorted(k for k in header if k != '__metadata__')})"
            )
        if info.get("dtype") != dtype:
            want = {"U8": "torch.uint8", "F16": "torch.float16"}.get(dtype, "torch.int64")
            raise ShardError(f"{s.url}: tensor {key!r} is {info.get('dtype')}, expected {want}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2):
            raise unreadable(f"tensor {key!r} has no shape or data_offsets")
        begin, end = offsets
        if (
            not (0 <= begin <= end <= size - base)
            or end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize
        ):
            raise unreadable(f"tensor {key!r} has data_offsets {offsets} that do not fit its shape {shape}")
        count = s.entry["count"]
        if key == "images":
            if tuple(shape) != (count, *s.image_shape):
                raise ShardError(
                    f"{s.url}: images have shape {list(shape)}, the index says {[count, *s.image_shape]}"
                )
        elif tuple(shape) != (count,):
            raise ShardError(f"{s.url}: {key} have shape {list(shape)}, the index says [{count}]")
        at[key] = base + begin

    def read_int64(key: str) -> torch.Tensor:
        raw = os.pread(fd, 8 * s.rows, at[key])
        if len(raw) != 8 * s.rows:
            raise unreadable(f"{key} are truncated")
        return torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))  # (rows,)

    labels, ids = read_int64("labels"), read_int64("ids")
    classes = max(s.num_classes, 1)  # unlabelled (num_classes 0): every label is the null class, 0
    if s.rows and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ShardError(
            f"{s.url}: labels span [{int(labels.min())}, {int(labels.max())}], outside [0, {classes})"
        )
    c, h, w = s.image_shape
    return _OpenShard(fd, at["images"], c * h * w * _IMAGE_ST[s.dtype][1], labels, ids)


def _cached_copy(url: str, sha256: str) -> Path:
    """The local, verified copy of remote shard ``url``: downloaded and hashed once, then reused."""
    root = cache_dir()
    target = root / f"{sha256}.safetensors"
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{sha256}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process downloads; the others wait and find the copy
        if target.exists():
            return target
        tmp = root / f".{sha256}.{uuid.uuid4().hex}.part"
        h = hashlib.sha256()
        fs, path = storage.filesystem(url)
        try:
            with fs.open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
            digest = h.hexdigest()
            if digest != sha256:
                raise ShardError(
                    f"{url}: checksum mismatch (sha256 {digest[:16]}... but {INDEX_FILE} says {sha256[:16]}...); "
                    "the shard is corrupt or was partly copied; rewrite the partition"
                )
            os.replace(tmp, target)
        except FileNotFoundError:
            raise ShardError(
                f"{url}: shard listed in {INDEX_FILE} is missing; rewrite the partition"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------------------------------------------
# the dataset


class StreamedDataset(Dataset):
    """Partition shards as a map-style dataset, read lazily: the API of ``ImageDataset`` without ``images``.

    ``batch_uint8(index)`` reads only the rows asked for; ``labels`` and ``ids`` of the whole set open every
    shard (16 bytes per example stay in memory), so ask for them only when needed (evaluation). ``subset``
    is a view (positions into the same shards). Partition ``k`` of ``open_partitions`` occupies the
    ``k``-th contiguous block of the global index.
    """

    in_memory = False  # the trainers read it through DataLoader workers

    def __init__(
        self,
        shards: _ShardSet,
        *,
        num_classes: int,
        image_shape: tuple[int, int, int],
        class_names: list[str] | None = None,
        meta: dict[str, Any] | None = None,
        positions: torch.Tensor | None = None,
    ):
        self._set, self.num_classes, self.image_shape = shards, num_classes, image_shape
        self.dtype = shards.shards[0].dtype if shards.shards else "uint8"  # uint8 pixels or float16 latents
        self.class_names, self.meta, self.skipped = class_names, dict(meta or {}), []
        self._positions = positions  # int64 (N,) into the shards' global index; None = all, in order

    def __len__(self) -> int:
        return self._set.total if self._positions is None else int(self._positions.numel())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image float (C, H, W) in [-1, 1], label int64 scalar)."""
        images, labels = self.batch(torch.tensor([int(i)]))
        return images[0], labels[0]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float (B, C, H, W) in the model's space, y int64 (B,)) for integer indices (B,)."""
        images, labels = self.batch_uint8(index)
        return to_model_input(images), labels  # (B, C, H, W), (B,)

    def batch_uint8(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x as stored (B, C, H, W): uint8 pixels, or float16 latents, y int64 (B,)), reading only those
        rows (the name says what pixel partitions give; trainers convert with ``to_model_input``)."""
        positions = self._global(index)  # (B,)
        b = positions.numel()
        images = np.empty((b, int(np.prod(self.image_shape))), dtype=_IMAGE_ST[self.dtype][2])  # (B, C*H*W)
        labels = torch.empty(b, dtype=torch.int64)  # (B,)
        shard, row = self._set.locate(positions)
        for i in shard.unique().tolist():
            where = (shard == i).nonzero().squeeze(1)  # (b_i,) batch slots served by shard i
            rows = row[where]
            opened = self._set.shard(i)
            labels[where] = opened.labels[rows]
            _read_rows(opened, rows.tolist(), where.tolist(), images, self._set.shards[i].url)
        return torch.from_numpy(images).view(b, *self.image_shape), labels  # (B, C, H, W), (B,)

    @property
    def labels(self) -> torch.Tensor:
        """int64 (N,): opens every shard (and verifies it, once)."""
        return self._column("labels")

    @property
    def ids(self) -> torch.Tensor:
        """int64 (N,) source ids: opens every shard (and verifies it, once)."""
        return self._column("ids")

    def _column(self, key: str) -> torch.Tensor:
        per_shard = [getattr(self._set.shard(i), key) for i in range(len(self._set.shards))]
        every = torch.cat(per_shard) if per_shard else torch.empty(0, dtype=torch.int64)  # (total,)
        return every if self._positions is None else every[self._positions]

    def subset(self, index: torch.Tensor | list[int] | np.ndarray) -> StreamedDataset:
        return StreamedDataset(
            self._set, num_classes=self.num_classes, image_shape=self.image_shape, class_names=self.class_names,
            meta=self.meta, positions=self._global(index),
        )  # fmt: skip

    def opened_shards(self) -> list[int]:
        """Shards (flat numbers over all partitions) this process has opened so far."""
        return self._set.opened()

    def close(self) -> None:
        """Close this process's shard files (they reopen on the next read)."""
        self._set.close()

    def _global(self, index: torch.Tensor | list[int] | np.ndarray) -> torch.Tensor:
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if tuple(index.shape) != (len(self),):
                raise ValueError(f"boolean index must have shape ({len(self)},), got {tuple(index.shape)}")
            index = index.nonzero().squeeze(1)
        if index.dim() != 1 or index.is_floating_point():
            raise ValueError(
                f"index must be 1-D integers or a boolean mask, got {index.dtype} {tuple(index.shape)}"
            )
        index = index.to(torch.int64)
        n = len(self)
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"index out of range for a dataset of {n} examples")
        index = torch.where(index < 0, index + n, index)
        return index if self._positions is None else self._positions[index]

    def __repr__(self) -> str:
        return (
            f"StreamedDataset(n={len(self)}, image_shape={self.image_shape}, num_classes={self.num_classes}, "
            f"shards={len(self._set.shards)})"
        )


def _read_rows(opened: _OpenShard, rows: list[int], slots: list[int], out: np.ndarray, url: str) -> None:
    """out[slots[j]] = image row rows[j] of the shard, merging runs of consecutive rows into one read."""
    j, n, size = 0, len(rows), opened.row_bytes
    while j < n:
        k = j + 1
        while k < n and rows[k] == rows[k - 1] + 1 and slots[k] == slots[k - 1] + 1:
            k += 1
        view = memoryview(out[slots[j] : slots[j] + (k - j)]).cast("B")
        got = os.preadv(opened.fd, [view], opened.images_at + rows[j] * size)
        if got != len(view):
            raise ShardError(
                f"{url}: not a readable safetensors file (image rows {rows[j]}..{rows[k - 1]} are truncated)"
            )
        j = k


def _partition_shards(url: str, limit: int | None) -> tuple[dict[str, Any], list[_Shard]]:
    index = read_index(url)
    shape = tuple(index["image_shape"])
    want = index["count"] if limit is None else min(limit, index["count"])
    shards, have = [], 0
    for entry in index["shards"]:
        if have >= want:
            break
        rows = min(entry["count"], want - have)
        dtype = str(image_dtype(index)).removeprefix("torch.")
        shards.append(
            _Shard(storage.join(url, entry["file"]), entry, rows, index["num_classes"], shape, dtype)
        )  # type: ignore[arg-type]
        have += rows
    return index, shards


def _class_names(index: dict[str, Any]) -> list[str] | None:
    names = index.get("meta", {}).get("class_names")
    ok = (
        isinstance(names, list)
        and len(names) == index["num_classes"]
        and all(isinstance(s, str) for s in names)
    )
    return names if ok else None


def open_shards(url: str, *, verify: bool = True, limit: int | None = None) -> StreamedDataset:
    """The partition at ``url`` (its first ``limit`` examples if given), streamed; reads only ``index.json``."""
    index, shards = _partition_shards(url, limit)
    return StreamedDataset(
        _ShardSet(shards, verify), num_classes=index["num_classes"], image_shape=tuple(index["image_shape"]),
        class_names=_class_names(index), meta=index.get("meta", {}),
    )  # fmt: skip


def open_partitions(
    urls: list[str], *, verify: bool = True, limit: int | None = None
) -> tuple[StreamedDataset, list[int]]:
    """(the union of the partitions at ``urls``, each partition's example count), streamed.

    The classes are the largest ``num_classes`` of the indexes; every partition must share one image shape.
    """
    indexes, shards, counts = [], [], []
    for url in urls:
        index, part = _partition_shards(url, limit)
        indexes.append(index)
        shards.extend(part)
        counts.append(sum(s.rows for s in part))
    for url, index in zip(urls, indexes):
        if index["image_shape"] != indexes[0]["image_shape"]:
            raise ValueError(
                f"{url} holds images of shape {index['image_shape']} but {urls[0]} holds "
                f"{indexes[0]['image_shape']}; every partition of a run must have one image shape"
            )
        if index.get("dtype", "uint8") != indexes[0].get("dtype", "uint8"):
            raise ValueError(
                f"{url} and {urls[0]} hold different spaces (pixels and latents); rewrite the partitions"
            )
    num_classes = max(ix["num_classes"] for ix in indexes)
    names = next((n for ix in indexes if (n := _class_names(ix)) and len(n) == num_classes), None)
    dataset = StreamedDataset(
        _ShardSet(shards, verify), num_classes=num_classes, image_shape=tuple(indexes[0]["image_shape"]),
        class_names=names, meta={"latent": indexes[0]["meta"]["latent"]} if "latent" in indexes[0].get("meta", {}) else None,
    )  # fmt: skip
    return dataset, counts
