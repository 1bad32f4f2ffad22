"""Shared helpers for the gRPC tests: tiny random-weight checkpoints and servers on 127.0.0.1.

Weights are random (not trained) but not the zero adaLN-Zero init, so every output is a non-trivial
function of (x_t, t, y) and a test comparing numbers can fail.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from ddm.core import checkpoint
from ddm.expert.model import DiT, DiTConfig
from ddm.router.model import RouterConfig, RouterNet

IMAGE = dict(image_size=8, in_channels=1, num_classes=3)
EXPERT_CFG = DiTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2, **IMAGE)
ROUTER_CFG = dict(patch_size=4, hidden_size=32, depth=1, num_heads=2, **IMAGE)


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def expert_checkpoint(
    root: Path,
    k: int,
    *,
    cfg: DiTConfig = EXPERT_CFG,
    arch: str = "DiT-tiny",
    class_names: list[str] | None = None,
) -> str:
    """Write ``{root}/experts/expert-k/checkpoints`` (the run-root layout) and return that directory."""
    model = DiT(cfg)
    _randomise(model, seed=100 + k)
    directory = str(root / "experts" / f"expert-{k}" / "checkpoints")
    state = model.state_dict()
    tensors = {
        **{f"model.{n}": v for n, v in state.items()},
        **{f"ema.{n}": v.clone() for n, v in state.items()},
    }
    meta = {"kind": "expert", "name": f"expert-{k}", "arch": arch, "model": cfg.to_dict()}
    checkpoint.save(directory, 7, tensors, {**meta, **({"class_names": class_names} if class_names else {})})
    return directory


def router_checkpoint(root: Path, num_experts: int, class_names: list[str] | None = None) -> str:
    """Write ``{root}/router/checkpoints`` with a random RouterNet and return that directory."""
    cfg = RouterConfig(num_experts=num_experts, **ROUTER_CFG)
    net = RouterNet(cfg)
    _randomise(net, seed=2, std=0.1)  # mild logits: every strategy routes rows to both experts
    directory = str(root / "router" / "checkpoints")
    state = net.state_dict()
    tensors = {
        **{f"model.{n}": v for n, v in state.items()},
        **{f"ema.{n}": v.clone() for n, v in state.items()},
    }
    meta = {"kind": "router", "name": "router", "model": cfg.to_dict()}
    checkpoint.save(directory, 3, tensors, {**meta, **({"class_names": class_names} if class_names else {})})
    return directory


def self_signed(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost made with the openssl CLI: (cert, key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
