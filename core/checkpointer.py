"""Saves and restores a job's model, EMA and optimizer under ``{output}/checkpoints``.

One format for every job and every parallelism: full tensors (``model.*``, ``ema.*``, ``optim.*``) in
one safetensors file with the job's metadata (``ddm.core.checkpoint``). Under FSDP the sharded state is
gathered first (every rank calls ``save``; rank 0 writes) and re-sharded on restore, so a checkpoint
written at one world size resumes at another, and servers load it like any other.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ddm
from ddm.core import checkpoint, parallel, storage
from ddm.core.ema import EMA


def git_commit() -> str | None:
    """The commit of the code checkout, if it is a git work tree with at least one commit."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class Checkpointer:
    """``kind`` ("expert", "router", "student") goes into the metadata and ``restore`` refuses any
    other kind; ``model_config`` (anything with ``to_dict``) must match on restore."""

    def __init__(self, job: Any, model_config: Any, world_size: int, *, kind: str, arch: str):
        self.directory = storage.join(job.output, "checkpoints")
        self.keep = job.train.keep_checkpoints
        self.model_config = model_config
        self.kind = kind
        self.meta: dict[str, Any] = {
            "kind": kind,
            "name": job.name,
            "arch": arch,
            "model": model_config.to_dict(),
            "data": job.data.model_dump(mode="json"),
            "train": job.train.model_dump(mode="json"),
            "world_size": world_size,
            "ddm_version": ddm.__version__,
            "git_commit": git_commit(),
        }

    def url(self, step: int) -> str:
        return storage.join(self.directory, checkpoint.file_name(step))

    def save(
        self,
        step: int,
        model: nn.Module,
        ema: EMA,
        optimizer: torch.optim.Optimizer,
        *,
        write: bool,
        **extra: Any,
    ) -> str:
        """Gather the state (collective under FSDP: call on every rank) and, where ``write``, save it."""
        tensors = {f"model.{k}": v for k, v in parallel.full_state(model.state_dict()).items()}
        tensors.update({f"ema.{k}": v for k, v in parallel.full_state(ema.state_dict()).items()})
        tensors.update(parallel.optimizer_tensors(optimizer))
        if not write:
            return self.url(step)
        return checkpoint.save(self.directory, step, tensors, {**self.meta, **extra}, keep=self.keep)

    def restore(
        self, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer
    ) -> checkpoint.Checkpoint | None:
        """Load the newest checkpoint into the components; None if there is none."""
        url = checkpoint.latest(self.directory)
        if url is None:
            return None
        ckpt = checkpoint.load(url)
        if ckpt.meta.get("kind") != self.kind:
            raise ValueError(
                f"{url}: a {ckpt.meta.get('kind')!r} checkpoint, not {self.kind!r}; use another output directory"
            )
        if ckpt.meta.get("model") != self.model_config.to_dict():
            raise ValueError(
                f"{url}: the checkpoint's model {ckpt.meta.get('model')} differs from the job's model "
                f"{self.model_config.to_dict()}; write to a new output directory, or start over with "
                "resume=False (--no-resume)"
            )
        parallel.load_full_state(model, ckpt.prefixed("model"))
        parallel.load_full_state(ema.module, ckpt.prefixed("ema"))
        parallel.load_optimizer_tensors(optimizer, ckpt.tensors)
        return ckpt

    def clear(self) -> None:
        """Remove every checkpoint (a fresh start must not be pruned against an older run's steps)."""
        for name in storage.listdir(self.directory):
            if name.startswith("step-") or name == "latest.json":
                storage.remove(storage.join(self.directory, name))
