"""Where a run's stages and jobs write under the run root (torch-free: ``ddm status`` and ``ddm logs``
read a root through these without loading any network code).

Run root layout::

    manifest.json
    curate/embeddings.safetensors   curate/report.json   curate/near_duplicates.png
    clusters/clustering.*           clusters/report.json clusters/samples.png
    partitions/expert-K/index.json + shard-*.safetensors
    experts/expert-K/job.toml  checkpoints/  metrics.csv  loss.png  heartbeat.json
    router/job.toml  checkpoints/  accuracy_vs_t.json|png  metrics.csv
    router/gen-G/                    the router after an add-expert / retire-expert (same files)
    lifecycle/expert-K/              the added data's embeddings and curation report
    eval/NAME/samples.png  metrics.json
    distill/job.toml  checkpoints/  metrics.csv  eval/{ensemble,student}-STEPS/samples.png  eval/table.{json,md}
    logs/                            TorchX local scheduler logs
"""

from __future__ import annotations

import os
import re
from typing import Any

from ddm.core import storage


def expert_names(cfg: Any) -> list[str]:
    """The run's training jobs of the experts stage: ``monolith``, or ``expert-0`` .. ``expert-{K-1}``."""
    return ["monolith"] if cfg.mode == "monolith" else [f"expert-{k}" for k in range(cfg.partition.k)]


def job_output(root: str, name: str) -> str:
    """Where a job of the run writes (checkpoints, heartbeat): ``router/``, ``distill/`` or ``experts/NAME/``."""
    if name in ("router", "distill"):
        return storage.join(root, name)
    if name.startswith("router-gen-"):  # a router trained by a lifecycle command (coordinator/lifecycle.py)
        return storage.join(root, "router", name.removeprefix("router-"))
    return storage.join(root, "experts", name)


def expert_output(cfg: Any, name: str) -> str:
    return job_output(cfg.root, name)


def router_output(cfg: Any) -> str:
    return job_output(cfg.root, "router")


def machine_cache() -> str:
    """``$DDM_CACHE`` or ``~/.cache/ddm``: classifiers are keyed by dataset identity, so one cache
    serves every run and every ``ddm eval`` on this machine."""
    return os.environ.get("DDM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ddm"))


def local_log_dir(root: str) -> str:
    """Where the local scheduler writes job logs (files, not objects): ``ROOT/logs`` for a local root; for
    an object-store root a folder on this machine named after it, so ``ddm logs`` finds them later."""
    if "://" not in root:
        return os.path.abspath(os.path.join(root, "logs"))
    return os.path.join(machine_cache(), "logs", re.sub(r"[^A-Za-z0-9._-]+", "_", root))


def trained_to(output: str, steps: int) -> bool:
    """A training job is complete when its newest checkpoint is at the configured number of steps."""
    pointer = storage.join(output, "checkpoints", "latest.json")
    if not storage.exists(pointer):
        return False
    try:
        return int(storage.read_json(pointer)["step"]) >= steps
    except (ValueError, KeyError, TypeError):
        return False


def expert_is_complete(cfg: Any, name: str) -> bool:
    return trained_to(expert_output(cfg, name), cfg.experts.train.steps)


def router_is_complete(cfg: Any) -> bool:
    """Trained to the end and its final accuracy-vs-t written: the job writes that after its last
    checkpoint, so a router killed in between is not complete (its rerun only evaluates)."""
    out = router_output(cfg)
    return trained_to(out, cfg.router.train.steps) and storage.exists(storage.join(out, "accuracy_vs_t.json"))
