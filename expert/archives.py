"""Readers for the packed formats users bring: webdataset tar shards and parquet (a Hugging Face export).

Both read any fsspec URL (local, ``s3://``) through ``ddm.core.storage``, one file at a time, in the
order of the (brace-expanded) URL list, and go through ``decode_records`` (``ddm.expert.data``): the
same decoding, resizing and validation as the image folders. A record whose image bytes do not decode
is skipped and counted (``ImageDataset.skipped``, then the curate report); a missing field, a wrong
column or a bad label is a ``DataError`` naming the record or column and the setting to change.

webdataset layout: members grouped by key (the member path up to the first dot of its file name), as
webdataset writes them: ``NAME.jpg`` (or .jpeg/.png/.webp/.bmp) and ``NAME.cls`` (the label as text)
or ``NAME.json`` (an object whose ``data.label_field`` key holds the label). The stdlib ``tarfile``
reads each shard as a stream (no seeking, so object stores need no random access; .tar.gz works too):
webdataset's own reader would add a dependency for what is thirty lines here.

parquet layout: an image column (``data.image_field``) that is binary or a struct with a ``bytes``
field (what ``datasets.Image`` writes) and an integer label column (``data.label_field``). Class names
come from the Hugging Face schema metadata (a ``ClassLabel`` feature's names) when it is there.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

from ddm.core import storage
from ddm.expert.config import DataConfig
from ddm.expert.data import IMAGE_EXTENSIONS, DataError, DatasetNotFoundError, ImageDataset, decode_records
from ddm.expert.sources import expand_braces

__all__ = ["load_parquet", "load_webdataset", "parquet_files", "tar_samples"]

IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
UNLABELLED_HINT = "set data.label_field = '' if the data has no labels"

Record = tuple[str, Callable[[], bytes], int]


def _urls(pattern: str) -> list[str]:
    try:
        return expand_braces(pattern)
    except ValueError as e:
        raise DataError(f"data.path: {e}") from None


def _labelled(cfg: DataConfig) -> bool:
    return cfg.label_field != ""


def _num_classes(labels: list[int], names: list[str] | None, labelled: bool) -> int:
    if not labelled:
        return 0
    if names is not None:
        return len(names)
    return max(labels) + 1 if labels else 1


# ---------------------------------------------------------------------------------------------------
# webdataset tar shards


def _split_key(member: str) -> tuple[str, str]:
    """(key, suffix) as webdataset splits a member name: 'a/b/x.seg.png' -> ('a/b/x', 'seg.png')."""
    head, _, base = member.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (suffix.lower() if dot else "")


def tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for each sample of one tar shard, in file order; a shard that is not a tar
    or ends early is a DataError naming it."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise DatasetNotFoundError(
            f"{url}: tar shard not found; check data.path (braces expand, e.g. {{000..009}})"
        )
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, suffix = _split_key(member.name)
                if k.rsplit("/", 1)[-1].startswith(".") or not suffix:
                    continue  # hidden files and extension-less members are not part of a sample
                if k != key:
                    if key is not None:
                        yield key, parts
                    key, parts = k, {}
                extracted = tar.extractfile(member)
                parts[suffix] = extracted.read() if extracted is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(
            f"{url}: not a readable tar shard ({e}); it is corrupt or truncated, re-create it"
        ) from None
    if key is not None:
        yield key, parts


def _tar_label(url: str, key: str, parts: dict[str, bytes], label_field: str) -> int:
    where = f"{url}: sample {key!r}"
    if "cls" in parts:
        text = parts["cls"].decode("utf-8", "replace").strip()
        try:
            label = int(text)
        except ValueError:
            raise DataError(f"{where}: {key}.cls holds {text[:40]!r}, not an integer class label") from None
    elif "json" in parts:
        try:
            obj = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: {key}.json is not valid JSON ({e})") from None
        if not isinstance(obj, dict) or label_field not in obj:
            have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(
                f"{where}: {key}.json has no {label_field!r} key (it has {have}); set data.label_field to "
                f"the key holding the class, or {UNLABELLED_HINT}"
            )
        label = obj[label_field]
        if isinstance(label, bool) or not isinstance(label, int):
            raise DataError(f"{where}: {key}.json's {label_field!r} is {label!r}, not an integer class label")
    else:
        raise DataError(
            f"{where} has no label ({key}.cls or {key}.json; it has {sorted(parts)}); {UNLABELLED_HINT}"
        )
    if label < 0:
        raise DataError(f"{where}: class label {label} is negative")
    return label


def _tar_records(urls: list[str], cfg: DataConfig, labels: list[int]) -> Iterator[Record]:
    for url in urls:
        for key, parts in tar_samples(url):
            suffix = next((s for s in IMAGE_SUFFIXES if s in parts), None)
            if suffix is None:
                raise DataError(
                    f"{url}: sample {key!r} has no image ({key}.jpg/.png/...; it has {sorted(parts)}); "
                    "every sample needs one image member"
                )
            label = _tar_label(url, key, parts, cfg.label_field) if _labelled(cfg) else 0
            labels.append(label)
            data = parts[suffix]
            yield f"{url}#{key}.{suffix}", (lambda d=data: d), label


def load_webdataset(cfg: DataConfig) -> ImageDataset:
    """Every sample of the tar shards ``cfg.path`` expands to, decoded like an image folder's files."""
    urls = _urls(cfg.path)
    labels: list[int] = []
    ds = decode_records(cfg.path, _tar_records(urls, cfg, labels), image_size=cfg.image_size,
                        channels=cfg.channels, limit=cfg.limit, num_classes=None, class_names=None,
                        meta={"shards": len(urls)})  # fmt: skip
    return _with_classes(ds, _num_classes(labels, None, _labelled(cfg)), None)


def _with_classes(ds: ImageDataset, num_classes: int, names: list[str] | None) -> ImageDataset:
    return ImageDataset(images=ds.images, labels=ds.labels, ids=ds.ids, num_classes=num_classes,
                        class_names=names, skipped=ds.skipped, meta=ds.meta)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# parquet


def parquet_files(pattern: str) -> list[str]:
    """The parquet files ``pattern`` names: brace-expanded; a folder stands for every ``*.parquet`` under
    it (sorted, as a Hugging Face export's ``data/train-00000-of-00004.parquet`` ...)."""
    out: list[str] = []
    for url in _urls(pattern):
        fs, path = storage.filesystem(url)
        if fs.isdir(path):
            base = path.rstrip("/") + "/"
            found = sorted(p[len(base) :] for p in fs.find(path) if p.endswith(".parquet"))
            if not found:
                raise DataError(f"{url}: a folder with no .parquet files; data.path must name parquet files")
            out.extend(storage.join(url, rel) for rel in found)
        elif fs.exists(path):
            out.append(url)
        else:
            raise DatasetNotFoundError(f"{url}: parquet file not found; check data.path")
    return out


def _hf_class_names(schema: Any, label_field: str) -> list[str] | None:
    """A Hugging Face ClassLabel's names from the parquet schema metadata, if it has them."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][label_field]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _check_columns(url: str, schema: Any, cfg: DataConfig) -> bool:
    """Validate the image and label columns; True when the image column is a struct with 'bytes'."""
    import pyarrow as pa

    columns = schema.names
    if cfg.image_field not in columns:
        raise DataError(
            f"{url}: no image column {cfg.image_field!r} (columns: {columns}); set data.image_field to the "
            "column holding the encoded images"
        )
    kind = schema.field(cfg.image_field).type
    is_struct = pa.types.is_struct(kind)
    if is_struct:
        if kind.get_field_index("bytes") < 0:
            raise DataError(
                f"{url}: image column {cfg.image_field!r} is a struct without a 'bytes' field ({kind}); "
                "it must hold the encoded image bytes"
            )
    elif not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise DataError(
            f"{url}: image column {cfg.image_field!r} is {kind}, not binary image bytes or a "
            "{bytes, path} struct; set data.image_field to the image column"
        )
    if _labelled(cfg):
        if cfg.label_field not in columns:
            raise DataError(
                f"{url}: no label column {cfg.label_field!r} (columns: {columns}); set data.label_field to the "
                f"integer label column, or {UNLABELLED_HINT}"
            )
        label_type = schema.field(cfg.label_field).type
        if not pa.types.is_integer(label_type):
            raise DataError(
                f"{url}: label column {cfg.label_field!r} is {label_type}, not integers; set data.label_field "
                f"to the integer class column, or {UNLABELLED_HINT}"
            )
    return is_struct


def _parquet_records(files: list[str], cfg: DataConfig, labels: list[int], names: list) -> Iterator[Record]:
    import pyarrow.parquet as pq

    for url in files:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for a bad file
                raise DataError(
                    f"{url}: not a readable parquet file ({e}); it is corrupt, re-export it"
                ) from None
            schema = pf.schema_arrow
            is_struct = _check_columns(url, schema, cfg)
            if _labelled(cfg) and not names:
                names.append(_hf_class_names(schema, cfg.label_field))
            columns = [cfg.image_field] + ([cfg.label_field] if _labelled(cfg) else [])
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=columns):
                images = batch.column(0)
                if is_struct:
                    images = images.field("bytes")
                image_values = images.to_pylist()
                label_values = batch.column(1).to_pylist() if _labelled(cfg) else [0] * len(image_values)
                for data, label in zip(image_values, label_values):
                    name = f"{url}#row{row}"
                    row += 1
                    if label is None or label < 0:
                        raise DataError(
                            f"{name}: label column {cfg.label_field!r} is {label!r}; every row needs a class "
                            f"label >= 0, or {UNLABELLED_HINT}"
                        )
                    labels.append(int(label))
                    yield name, (lambda d=data: d if d is not None else b""), int(label)


def load_parquet(cfg: DataConfig) -> ImageDataset:
    """Every row of the parquet files ``cfg.path`` names, decoded like an image folder's files; rows
    whose image bytes are empty or do not decode are skipped and counted."""
    files = parquet_files(cfg.path)
    labels: list[int] = []
    names: list[list[str] | None] = []
    ds = decode_records(cfg.path, _parquet_records(files, cfg, labels, names), image_size=cfg.image_size,
                        channels=cfg.channels, limit=cfg.limit, num_classes=None, class_names=None,
                        meta={"files": len(files)})  # fmt: skip
    class_names = names[0] if names else None
    num_classes = _num_classes(labels, class_names, _labelled(cfg))
    if labels and _labelled(cfg) and max(labels) >= num_classes:
        raise DataError(
            f"{cfg.path}: label {max(labels)} is out of range for the {num_classes} class names in the "
            "file's Hugging Face metadata"
        )
    return _with_classes(ds, num_classes, class_names)
