"""Latents of the dataset, computed once at curation and cached on the run root.

Layout (under ``ROOT/latents/``)::

    chunk-00000.safetensors   raw  float16 (n, c, h, w), sums float64 [count, sum, sum of squares]
    ...
    index.json                {"key", "autoencoder", "path", "count", "chunk_size", "scale", "shift",
                               "image_shape", "latent_shape", "chunks": [...]}

Each chunk is ``chunk_size`` consecutive images, written atomically with its own running sums; the index
is written last, with the scale and shift the sums give (``ddm.expert.autoencoder.latent_stats``) unless
the config sets them by hand. A run stopped part-way resumes at the first missing chunk; a changed dataset,
autoencoder or chunk size (the ``key``) recomputes everything. The raw latents are stored; partitions hold
them normalized, ``(raw - shift) * scale``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddm.core import storage
from ddm.expert.autoencoder import Autoencoder, LatentStats, latent_record, latent_stats, load_autoencoder
from ddm.expert.data import ImageDataset
from ddm.expert.images import to_model_range

log = logging.getLogger("ddm.latents")
INDEX = "index.json"


def _chunk(i: int) -> str:
    return f"chunk-{i:05d}.safetensors"


@dataclass
class Latents:
    """The cached latents: raw float16 (N, c, h, w), their stats and the JSON record of their space."""

    raw: torch.Tensor
    stats: LatentStats
    record: dict[str, Any]

    def normalized(self, index: torch.Tensor) -> torch.Tensor:
        """float16 (B, c, h, w): z = (raw - shift) * scale of rows ``index``, what the partitions hold."""
        z = (self.raw[index].to(torch.float32) - self.stats.shift) * self.stats.scale
        return z.to(torch.float16)


def cache_key(data: ImageDataset, name: str, path: str, chunk_size: int) -> str:
    ids = hashlib.sha256(data.ids.numpy().tobytes()).hexdigest()[:16]
    return f"{name}|{path}|{tuple(data.images.shape)}|{ids}|{chunk_size}"


def encode_dataset(
    data: ImageDataset,
    cfg: Any,
    root_url: str,
    *,
    device: Any = "cpu",
    autoencoder: Autoencoder | None = None,
    say: Any = log.info,
) -> Latents:
    """Every image of ``data`` encoded by ``cfg.autoencoder`` (a ``LatentConfig``), cached under ``root_url``."""
    key = cache_key(data, cfg.autoencoder, cfg.path, cfg.chunk_size)
    index_url = storage.join(root_url, INDEX)
    if storage.exists(index_url):
        index = storage.read_json(index_url)
        if index.get("key") == key:
            raw = torch.cat([_read_chunk(storage.join(root_url, c))[0] for c in index["chunks"]])
            say(f"[latents] cached at {root_url}: {len(raw)} latents of shape {index['latent_shape']}")
            stats = LatentStats(float(index["scale"]), float(index["shift"]))
            return Latents(raw, stats, _record(index))
        storage.remove(index_url)  # stale: recompute (chunks are overwritten below)
    ae = autoencoder or load_autoencoder(cfg.autoencoder, cfg.path, device)
    image_shape = tuple(int(d) for d in data.images.shape[1:])
    latent_shape = ae.latent_shape(image_shape)  # type: ignore[arg-type]
    n, parts, sums, names = len(data), [], torch.zeros(3, dtype=torch.float64), []
    for i, start in enumerate(range(0, n, cfg.chunk_size)):
        url = storage.join(root_url, _chunk(i))
        stop = min(start + cfg.chunk_size, n)
        cached = _reuse(url, key, stop - start)
        if cached is None:
            raw, part_sums = _encode_rows(ae, data.images[start:stop], cfg.batch_size)
            storage.write_bytes(
                url, st_save({"raw": raw.contiguous(), "sums": part_sums}, metadata={"key": key})
            )  # atomic: a stopped run leaves whole chunks only
        else:
            raw, part_sums = cached
        parts.append(raw)
        sums += part_sums
        names.append(_chunk(i))
        say(f"[latents] {stop}/{n} images encoded")
    measured = latent_stats(int(sums[0]), float(sums[1]), float(sums[2]))
    stats = LatentStats(
        cfg.scale if cfg.scale is not None else measured.scale,
        cfg.shift if cfg.shift is not None else measured.shift,
    )
    record = latent_record(cfg.autoencoder, cfg.path, stats, image_shape, latent_shape)
    index = {"key": key, "count": n, "chunk_size": cfg.chunk_size, "chunks": names,
             "measured": measured.to_json(), **record}  # fmt: skip
    storage.write_json(index_url, index)
    say(f"[latents] {n} images -> {list(latent_shape)}; scale {stats.scale:.5g}, shift {stats.shift:.5g}")
    return Latents(
        torch.cat(parts) if parts else torch.empty(0, *latent_shape, dtype=torch.float16), stats, record
    )


def _record(index: dict[str, Any]) -> dict[str, Any]:
    keys = ("autoencoder", "path", "scale", "shift", "image_shape", "latent_shape")
    return {k: index[k] for k in keys}


def _encode_rows(ae: Autoencoder, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw float16 (n, c, h, w), float64 [count, sum, sum of squares]) of uint8 images (n, C, H, W)."""
    out, sums = [], torch.zeros(3, dtype=torch.float64)
    for b in range(0, len(images), batch_size):
        raw = ae.encode(to_model_range(images[b : b + batch_size])).to("cpu", torch.float32)  # (B, c, h, w)
        if not torch.isfinite(raw).all():
            raise ValueError("the autoencoder produced non-finite latents; check latent.path")
        r64 = raw.double()
        sums += torch.stack(
            [torch.tensor(float(r64.numel()), dtype=torch.float64), r64.sum(), (r64 * r64).sum()]
        )
        out.append(raw.to(torch.float16))
    return torch.cat(out), sums


def _read_chunk(url: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        t = st_load(storage.read_bytes(url))
        return t["raw"], t["sums"]
    except (SafetensorError, KeyError, FileNotFoundError) as e:
        raise ValueError(
            f"{url}: unreadable latent chunk ({e}); delete {url} and rerun to recompute"
        ) from None


def _reuse(url: str, key: str, rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A chunk an earlier, stopped run wrote for this same key, else None (recompute it)."""
    if not storage.exists(url):
        return None
    payload = storage.read_bytes(url)
    try:
        header_len = int.from_bytes(payload[:8], "little")
        meta = json.loads(payload[8 : 8 + header_len]).get("__metadata__") or {}
        t = st_load(payload)
    except (SafetensorError, ValueError, UnicodeDecodeError):
        return None
    if meta.get("key") != key or "raw" not in t or "sums" not in t or len(t["raw"]) != rows:
        return None
    return t["raw"], t["sums"]
