"""Pinned numerics of the three trainers (expert, router, student) at a fixed seed on CPU fp32.

Each trainer runs a few steps on real Fashion-MNIST partitions with one thread; what is pinned is every
per-step loss (as the exact float64 hex of the logged value) and a SHA-256 of every tensor of the final
checkpoint (weights, EMA, optimizer state), so a refactor of the training loop is proven
numerics-identical bit for bit (tests/test_numerics.py compares against tests/data/numerics.json).

    python tests/numerics.py            # print the current figures as JSON
    python tests/numerics.py --write    # re-pin (only for a change that is *meant* to move numerics)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
PINNED = HERE / "data" / "numerics.json"


def tensor_digest(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 per group (model., ema., everything else) of the tensors' names, dtypes, shapes and bytes."""
    groups: dict[str, hashlib._Hash] = {}
    for name in sorted(tensors):
        group = name.split(".", 1)[0] if name.startswith(("model.", "ema.")) else "optimizer"
        h = groups.setdefault(group, hashlib.sha256())
        t = tensors[name].detach().contiguous().cpu().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {g: h.hexdigest() for g, h in sorted(groups.items())}


def environment() -> dict[str, str]:
    """What the pin depends on besides the code: torch's version and the CPU (its kernels differ)."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    return {"torch": torch.__version__, "cpu": cpu, "threads": "1"}


def _figures(result: Any, ckpt_dir: Path) -> dict[str, Any]:
    from ddm.core import checkpoint

    ckpt = checkpoint.load(str(ckpt_dir))
    return {
        "step": result.step,
        "losses": [float(v).hex() for v in result.losses],
        "tensors": tensor_digest(ckpt.tensors),
    }


def write_partitions(root: Path, n: int) -> None:
    """Partition 0 = classes 0-4, partition 1 = classes 5-9, of the first n training images."""
    from ddm.expert.data import load_fashion_mnist
    from ddm.expert.shards import write_shards

    ds = load_fashion_mnist(limit=n)
    for k, sel in enumerate((ds.labels < 5, ds.labels >= 5)):
        part = ds.subset(sel)
        write_shards(str(root / "partitions" / f"expert-{k}"), part.images, part.labels, part.ids,
                     num_classes=10, shard_size=512)  # fmt: skip


TRAIN = dict(warmup_steps=2, checkpoint_every=3, log_every=2, num_threads=1, precision="fp32")


def run_all(work: Path) -> dict[str, Any]:
    from ddm.expert.config import ExpertJobConfig
    from ddm.expert.trainer import train as train_expert
    from ddm.router.config import RouterJobConfig
    from ddm.router.distill import train as train_student
    from ddm.router.distill_config import DistillJobConfig
    from ddm.router.trainer import train as train_router

    torch.set_num_threads(1)
    root = work / "root"
    write_partitions(root, 160)
    out: dict[str, Any] = {}

    expert_jobs = []
    for k in range(2):
        job = ExpertJobConfig.model_validate(dict(
            name=f"expert-{k}", output=str(root / "experts" / f"expert-{k}"),
            data=dict(source="shards", path=str(root / "partitions" / f"expert-{k}")),
            model=dict(arch="DiT-T/4"),
            train=dict(steps=7, batch_size=16, seed=11 + k, lr=2e-3, ema_decay=0.9, **TRAIN),
        ))  # fmt: skip
        expert_jobs.append(job)
        result = train_expert(job, progress=False)
        out[f"expert-{k}"] = _figures(result, Path(job.output) / "checkpoints")

    router = RouterJobConfig.model_validate(dict(
        name="router", output=str(root / "router"), data=dict(root=str(root), k=2),
        train=dict(steps=7, batch_size=16, seed=3, lr=3e-3, **TRAIN),
        eval=dict(samples_per_bin=8, bins=2, batch_size=16),
    ))  # fmt: skip
    result = train_router(router, progress=False)
    out["router"] = _figures(result, root / "router" / "checkpoints")
    out["router"]["accuracy"] = [result.evaluation["conditional"], result.evaluation["unconditional"]]

    for teacher in ("partition", "ensemble"):
        student = DistillJobConfig.model_validate(dict(
            name="student", output=str(root / f"distill-{teacher}"),
            experts=[str(Path(j.output) / "checkpoints") for j in expert_jobs],
            data=dict(root=str(root), k=2),
            teacher=dict(kind=teacher, router=str(root / "router" / "checkpoints"), guidance_min=1, guidance_max=4),
            shortcut=dict(min_step=0.25, fraction=0.25),
            train=dict(steps=5, batch_size=8, seed=5, **TRAIN),
        ))  # fmt: skip
        result = train_student(student, progress=False)
        out[f"student-{teacher}"] = _figures(result, root / f"distill-{teacher}" / "checkpoints")
    return out


def pin_main(doc: str, pinned: Path, figures: Callable[[], dict[str, Any]], argv: list[str] | None) -> int:
    """The command line of a numerics pin: print the figures (with the environment) as JSON, and with
    ``--write`` store them in ``pinned``. Shared by this pin and tests/sampling_numerics.py."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write the figures to {pinned}")
    args = parser.parse_args(argv)
    text = json.dumps({**figures(), "environment": environment()}, indent=1, sort_keys=True) + "\n"
    if args.write:
        pinned.parent.mkdir(exist_ok=True)
        pinned.write_text(text)
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    import tempfile

    def figures() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            return run_all(Path(tmp))

    return pin_main(__doc__, PINNED, figures, argv)


if __name__ == "__main__":
    raise SystemExit(main())
