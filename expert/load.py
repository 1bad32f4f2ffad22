"""Load a trained expert from its checkpoint alone.

Checkpoints are self-describing (see ``checkpoint``): the safetensors header carries the DiT config,
so a server, the router or the evaluator rebuilds the network without the training config. Every
error names the file it is about. A distilled student (kind "student") is a DiT with extra inputs
and loads the same way; ``load_denoiser`` then returns a :class:`~ddm.expert.student.StudentDenoiser`.
"""

from __future__ import annotations

from typing import Any

import torch

from ddm.core import checkpoint, storage
from ddm.core.checkpoint import CheckpointError
from ddm.expert.denoiser import ModuleDenoiser
from ddm.expert.model import DiT, DiTConfig
from ddm.expert.objectives import objective_of
from ddm.expert.student import StudentDenoiser

LOADABLE_KINDS = ("expert", "student")


def load_model(
    url: str, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[DiT, dict[str, Any]]:
    """(DiT in eval mode without gradients, checkpoint metadata) from a checkpoint file or directory.

    ``ema=True`` loads the EMA weights (what sampling should use); ``ema=False`` the raw weights.
    """
    ckpt = checkpoint.load(url)
    meta = ckpt.meta
    if meta.get("kind", "expert") not in LOADABLE_KINDS:
        raise CheckpointError(
            f"{ckpt.url}: a {meta.get('kind')!r} checkpoint, not an expert or student (DiT) checkpoint"
        )
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{ckpt.url}: metadata has no 'model' config; not an expert checkpoint")
    try:
        cfg = DiTConfig.from_dict(meta["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.url}: invalid model config in metadata ({e})") from None
    prefix = "ema" if ema else "model"
    state = ckpt.prefixed(prefix)
    if not state:
        raise CheckpointError(
            f"{ckpt.url}: no '{prefix}.*' tensors; saved without {'EMA ' if ema else ''}weights"
        )
    model = DiT(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt.url}: {prefix} weights do not fit the model config in its metadata ({e})"
        ) from None
    try:
        objective_of(meta, ckpt.url)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model.to(device).eval().requires_grad_(False)
    return model, {**meta, "url": ckpt.url}


def recorded(url: str) -> dict[str, Any]:
    """What a checkpoint (file or directory) records about the space its model was trained in, read from
    its JSON sidecar (no weights): ``time_shift`` (1.0 when it records none: trained before the shift was
    derived, with the old default) and ``latent`` (``ddm.expert.autoencoder.latent_record``; None: pixels)."""
    file = url if url.endswith(".safetensors") else checkpoint.latest(url)
    if file is None:
        raise CheckpointError(f"{url}: no checkpoint found (expected step-*.safetensors or latest.json)")
    meta = storage.read_json(file.removesuffix(".safetensors") + ".json")
    return {"time_shift": float(meta.get("time_shift") or 1.0), "latent": meta.get("latent") or None}


def load_denoiser(
    url: str, *, ema: bool = True, device: str | torch.device = "cpu"
) -> ModuleDenoiser | StudentDenoiser:
    """The checkpoint's network behind the Denoiser interface (what samplers and servers take): a
    StudentDenoiser (guides itself in one pass) for a student, else a ModuleDenoiser."""
    model, meta = load_model(url, ema=ema, device=device)
    if model.config.guidance_embed:
        denoiser = StudentDenoiser(model)
    else:
        denoiser = ModuleDenoiser(model, model.num_classes, objective_of(meta, meta["url"]).name)
    names = meta.get("class_names")  # label i's name, where the trainer saved them (older checkpoints: none)
    denoiser.class_names = [str(n) for n in names] if isinstance(names, list) else None
    return denoiser
