"""Self-describing checkpoints: one safetensors file (weights, EMA, optimizer state) whose header
carries the JSON metadata, plus the same metadata as a readable ``.json`` sidecar.

Layout under a checkpoint directory::

    step-00001000.safetensors   tensors + metadata in the safetensors header
    step-00001000.json          the same metadata, for people and tools
    latest.json                 {"step": 1000, "file": "step-00001000.safetensors"}

Each file is written atomically (see ``storage``) and ``latest.json`` only after the weights, so a
crash at any point leaves the previous checkpoint intact and ``latest.json`` pointing at a whole one.
Nothing is ever unpickled: tensors come from safetensors, metadata from JSON.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ddm.core import storage

if TYPE_CHECKING:
    import torch

# torch (through safetensors.torch) loads only to save or load tensors: finding the latest checkpoint
# and reading its metadata, as ``ddm status`` does, stays torch-free.

FORMAT_VERSION = 1
META_KEY = "ddm"


@dataclass
class Checkpoint:
    url: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix.`` with the prefix removed (e.g. ``"ema"`` -> a state dict)."""
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what is wrong."""


def file_name(step: int) -> str:
    return f"step-{step:08d}.safetensors"


def save(
    directory: str, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, keep: int = 3
) -> str:
    """Write a checkpoint for ``step`` and point ``latest.json`` at it. Returns the file's URL."""
    from safetensors.torch import save as st_save

    meta = {**meta, "step": step, "format_version": FORMAT_VERSION}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    payload = st_save(contiguous, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    name = file_name(step)
    url = storage.join(directory, name)
    storage.write_bytes(url, payload)
    storage.write_json(url.removesuffix(".safetensors") + ".json", meta)
    storage.write_json(storage.join(directory, "latest.json"), {"step": step, "file": name})
    _prune(directory, keep)
    return url


def _prune(directory: str, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(list_steps(directory))
    for step in steps[:-keep]:
        base = storage.join(directory, file_name(step)).removesuffix(".safetensors")
        storage.remove(base + ".safetensors")
        storage.remove(base + ".json")


def list_steps(directory: str) -> list[int]:
    out = []
    for name in storage.listdir(directory):
        if name.startswith("step-") and name.endswith(".safetensors"):
            try:
                out.append(int(name[5:-12]))
            except ValueError:
                continue
    return sorted(out)


def latest(directory: str) -> str | None:
    """URL of the newest complete checkpoint in ``directory``, or None if there is none."""
    pointer = storage.join(directory, "latest.json")
    if storage.exists(pointer):
        info = storage.read_json(pointer)
        url = storage.join(directory, str(info["file"]))
        if storage.exists(url):
            return url
    steps = list_steps(directory)
    return storage.join(directory, file_name(steps[-1])) if steps else None


def read_metadata(raw: bytes, url: str) -> dict[str, Any]:
    """Parse the ddm metadata from a safetensors header without touching the tensors."""
    if len(raw) < 8:
        raise CheckpointError(f"{url}: truncated ({len(raw)} bytes); not a safetensors checkpoint")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise CheckpointError(
            f"{url}: header claims {header_len} bytes but the file has {len(raw)}; truncated or not safetensors"
        )
    try:
        header = json.loads(raw[8 : 8 + header_len])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(
            f"{url}: no ddm metadata in the safetensors header; not a ddm checkpoint"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{url}: metadata is not a JSON object")
    return meta


def load(url: str) -> Checkpoint:
    """Load a checkpoint file, or the latest one if ``url`` is a checkpoint directory."""
    if not url.endswith(".safetensors"):
        resolved = latest(url)
        if resolved is None:
            raise FileNotFoundError(
                f"{url}: no checkpoint found (expected step-*.safetensors or latest.json)"
            )
        url = resolved
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    raw = storage.read_bytes(url)
    meta = read_metadata(raw, url)
    try:
        tensors = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{url}: corrupt tensor data ({e})") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{url}: format_version {meta['format_version']} is newer than this ddm understands ({FORMAT_VERSION}); upgrade ddm"
        )
    return Checkpoint(url=url, tensors=tensors, meta=meta)
