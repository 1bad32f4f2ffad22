"""The stages of ``ddm run``: curate -> partition -> experts -> router -> eval -> distill.

Each stage reads and writes only under the run root and records itself in the manifest; a stage that
is done is skipped on a rerun, so the coordinator can be killed at any point and run again.

Run root layout::

    manifest.json
    curate/embeddings.safetensors   curate/report.json   curate/near_duplicates.png
    clusters/clustering.*           clusters/report.json clusters/samples.png
    partitions/expert-K/index.json + shard-*.safetensors
    experts/expert-K/job.toml  checkpoints/  metrics.csv  loss.png  heartbeat.json
    router/job.toml  checkpoints/  accuracy_vs_t.json|png  metrics.csv
    eval/NAME/samples.png  metrics.json
    distill/job.toml  checkpoints/  metrics.csv  eval/{ensemble,student}-STEPS/samples.png  eval/table.{json,md}
    logs/                            TorchX local scheduler logs
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ddm.coordinator import components
from ddm.coordinator.config import RunConfig
from ddm.coordinator.islands import IslandsConfig
from ddm.coordinator.manifest import CANCELLED, DONE, FAILED, RUNNING, SUCCEEDED, Manifest
from ddm.core import checkpoint, storage
from ddm.core.config import to_toml
from ddm.core.placement import Placement
from ddm.expert.config import DataConfig, ExpertJobConfig
from ddm.expert.data import ImageDataset, build_dataset

log = logging.getLogger("ddm.run")

STAGES = ("curate", "partition", "experts", "router", "eval", "distill")


class RunFailed(RuntimeError):
    pass


def expert_names(cfg: RunConfig) -> list[str]:
    return ["monolith"] if cfg.mode == "monolith" else [f"expert-{k}" for k in range(cfg.partition.k)]


def expert_output(cfg: RunConfig, name: str) -> str:
    return job_output(cfg.root, name)


def router_output(cfg: RunConfig) -> str:
    return job_output(cfg.root, "router")


def job_output(root: str, name: str) -> str:
    """Where a job of the run writes (checkpoints, heartbeat): ``router/`` or ``experts/NAME/``."""
    if name in ("router", "distill"):
        return storage.join(root, name)
    return storage.join(root, "experts", name)


def local_log_dir(root: str) -> str:
    """Where the local scheduler writes job logs (files, not objects): ``ROOT/logs`` for a local root; for
    an object-store root a folder on this machine named after it, so ``ddm logs`` finds them later."""
    import os
    import re

    if "://" not in root:
        return os.path.abspath(os.path.join(root, "logs"))
    from ddm.coordinator.eval_stage import machine_cache

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


def expert_is_complete(cfg: RunConfig, name: str) -> bool:
    return trained_to(expert_output(cfg, name), cfg.experts.train.steps)


def router_is_complete(cfg: RunConfig) -> bool:
    """Trained to the end and its final accuracy-vs-t written: the job writes that after its last
    checkpoint, so a router killed in between is not complete (its rerun only evaluates)."""
    out = router_output(cfg)
    return trained_to(out, cfg.router.train.steps) and storage.exists(storage.join(out, "accuracy_vs_t.json"))


@dataclass
class Pipeline:
    cfg: RunConfig
    islands: IslandsConfig
    manifest: Manifest
    progress: bool = True
    say: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))
    dry_run: bool = False  # build jobs without writing their configs (``ddm run --dry-run``)
    # Where the in-process stages' networks run (embeddings, eval, distillation table); None: resolved
    # from ``cfg.device`` the first time a stage needs it.
    placement: Placement | None = None
    _data: ImageDataset | None = None

    def where(self) -> Placement:
        """The coordinator's device, resolved once per pipeline (``cfg.device``)."""
        if self.placement is None:
            self.placement = Placement.resolve(self.cfg.device)
        return self.placement

    def data(self) -> ImageDataset:
        if self._data is None:
            self._data = build_dataset(self.cfg.data)
        return self._data

    def run(self, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
        for name in stages:
            if self.manifest.stage_done(name):
                self.say(f"[{name}] already done — skipped")
                continue
            if self.cfg.mode == "monolith" and name in ("curate", "partition"):
                self.manifest.set_stage(name, DONE, skipped="monolith mode trains on the whole dataset")
                continue
            self.say(f"[{name}] running")
            start = time.time()
            self.manifest.set_stage(name, RUNNING)
            try:
                info = getattr(self, f"stage_{name}")() or {}
            except Exception as e:
                self.manifest.set_stage(name, FAILED, error=f"{type(e).__name__}: {e}")
                raise
            self.manifest.set_stage(name, DONE, seconds=round(time.time() - start, 1), **info)
            self.say(f"[{name}] done in {time.time() - start:.0f} s")
        return self.manifest.data

    # stages ----------------------------------------------------------------------------------------
    def stage_curate(self) -> dict[str, Any]:
        from ddm.coordinator.curate import curate, embed_dataset, save_pairs_png

        data = self.data()
        feats = embed_dataset(data, self.cfg.partition, storage.join(self.cfg.root, "curate", "embeddings.safetensors"),
                              progress=self.progress, placement=self.where())  # fmt: skip
        result = curate(data, feats, self.cfg.curate)
        report = {
            "images": len(data),
            "kept": int(len(result.keep)),
            "exact_duplicates": result.exact_duplicates,
            "near_duplicates": result.near_duplicates,
            "degenerate_embeddings": result.degenerate,
            "near_duplicate_cosine": self.cfg.curate.near_duplicate_cosine,
            "skipped_unreadable": len(getattr(data, "skipped", []) or []),
            "example_pairs": [{"removed": int(a), "kept": int(b), "cosine": round(c, 4)} for a, b, c in result.pairs],
        }
        storage.write_bytes(storage.join(self.cfg.root, "curate", "keep.npy"), _npy(result.keep))
        storage.write_json(storage.join(self.cfg.root, "curate", "report.json"), report)
        save_pairs_png(data, result.pairs, storage.join(self.cfg.root, "curate", "near_duplicates.png"))
        self.say(
            f"[curate] {report['images']} images: {report['exact_duplicates']} exact and "
            f"{report['near_duplicates']} near duplicates and {report['degenerate_embeddings']} blank embeddings removed, "
            f"{report['skipped_unreadable']} unreadable skipped, {report['kept']} kept"
        )
        return {k: report[k] for k in ("images", "kept", "exact_duplicates", "near_duplicates", "degenerate_embeddings", "skipped_unreadable")}

    def stage_partition(self) -> dict[str, Any]:
        from ddm.coordinator.cluster import ClusterConfig, cluster_report, fit_clustering
        from ddm.coordinator.curate import embed_dataset
        from ddm.expert.images import save_grid
        from ddm.expert.shards import write_shards

        data = self.data()
        keep = torch.from_numpy(_load_npy(storage.read_bytes(storage.join(self.cfg.root, "curate", "keep.npy"))))
        feats = embed_dataset(data, self.cfg.partition, storage.join(self.cfg.root, "curate", "embeddings.safetensors"),
                              progress=self.progress, placement=self.where())  # fmt: skip
        p = self.cfg.partition
        ccfg = ClusterConfig(k=p.k, fine_k=min(p.fine_k, len(keep)), sample_size=p.sample_size, niter=p.niter,
                             seed=p.seed, balanced=p.balanced, tolerance=p.tolerance)  # fmt: skip
        clustering, labels = fit_clustering(feats[keep.numpy()], ccfg)
        clustering.save(storage.join(self.cfg.root, "clusters", "clustering"))
        report = cluster_report(labels, p.k)
        sizes = [int(s) for s in np.bincount(labels, minlength=p.k)]
        per_class = [np.bincount(data.labels[keep][labels == k].numpy(), minlength=data.num_classes).tolist() for k in range(p.k)]
        storage.write_json(storage.join(self.cfg.root, "clusters", "report.json"), {**_jsonable(report), "sizes": sizes, "class_counts": per_class})
        # A few images per cluster, one row each, so a person sees what each expert will learn.
        rows = []
        gen = np.random.default_rng(p.seed)
        for k in range(p.k):
            members = keep[torch.from_numpy(np.flatnonzero(labels == k))]
            pick = members[torch.from_numpy(gen.choice(len(members), size=min(12, len(members)), replace=False))]
            rows.append(torch.cat([data.images[pick], torch.full((12 - len(pick), *data.images.shape[1:]), 255, dtype=torch.uint8)]))
        save_grid(torch.cat(rows), storage.join(self.cfg.root, "clusters", "samples.png"), nrow=12)
        for k, name in enumerate(expert_names(self.cfg)):
            members = keep[torch.from_numpy(np.flatnonzero(labels == k))]
            write_shards(
                storage.join(self.cfg.root, "partitions", name),
                data.images[members], data.labels[members], data.ids[members],
                num_classes=data.num_classes, shard_size=p.shard_size,
                meta={"cluster": k, "run": self.cfg.name, "source": self.cfg.data.model_dump()},
            )  # fmt: skip
        self.say(f"[partition] cluster sizes {sizes} (imbalance {max(sizes) / max(1, min(sizes)):.3f})")
        return {"sizes": sizes}

    def expert_job(self, name: str) -> ExpertJobConfig:
        cfg = self.cfg
        if cfg.mode == "monolith":
            data = cfg.data
        else:
            part = storage.join(cfg.root, "partitions", name)
            data = DataConfig(source="shards", path=part, image_size=cfg.data.image_size, channels=cfg.data.channels)
        return ExpertJobConfig(name=name, output=expert_output(cfg, name), data=data, model=cfg.experts.model, train=cfg.experts.train)

    def _job(self, name: str, job_cfg: Any, output: str, island_name: str, component: Callable, complete: Callable[[], bool], **resources: Any):
        """Write the job's config next to its output and describe it for the launcher; the job runs as the
        island's ``j`` processes (torchrun for more than one: every trainer is data-parallel)."""
        from ddm.coordinator.launcher import JobSpec

        island = self.islands.island[island_name]
        if island.scheduler == "kubernetes" and "://" not in self.cfg.root:
            raise ValueError(
                f"island {island_name!r} runs jobs on a cluster, which cannot see the local run root {self.cfg.root}; "
                "use shared object storage, e.g. --root s3://bucket/run"
            )
        config_url = storage.join(output, "job.toml")
        if not self.dry_run:
            storage.write_bytes(config_url, to_toml(job_cfg.model_dump(mode="json")).encode())
        local = island.scheduler.startswith("local")
        # The job reaches the run root as the coordinator does: the S3 endpoint and region go into its
        # environment (credentials do not: local jobs inherit them, cluster jobs get them from a Secret),
        # unless the island brings its own view of the store: its `env`, or ConfigMaps (on Kubernetes an
        # explicit variable would override the ConfigMap's, which knows the in-cluster address).
        storage_env = {} if island.env_from_configmaps else storage.job_env()
        app = component(
            _absolute(config_url) if local else config_url,
            name=f"{self.cfg.name}-{name}",
            image=_cwd() if island.scheduler == "local_cwd" else (island.image or ""),
            python=sys.executable if local else "python",
            cpu=island.cpu, gpu=island.gpu, memMB=island.memMB, env={**storage_env, **island.env}, j=island.j,
            **resources,
        )  # fmt: skip
        return JobSpec(name=name, island=island_name, app=app, output=output, is_complete=complete)

    def _launch(self, jobs: list, max_attempts: int) -> None:
        """Run jobs to completion on their islands; raise RunFailed naming every job that failed."""
        from ddm.coordinator.kube import make_runner
        from ddm.coordinator.launcher import Launcher

        log_dir = local_log_dir(self.cfg.root)
        with make_runner(self.islands) as runner:
            launcher = Launcher(
                self.manifest, self.islands, runner,
                max_attempts=max_attempts, poll_seconds=self.cfg.experts.poll_seconds,
                lease_seconds=self.cfg.experts.lease_seconds, log_dir=log_dir, on_progress=self._job_progress,
            )  # fmt: skip
            outcomes = launcher.run(jobs)
        failed = {n: o for n, o in outcomes.items() if o.state != SUCCEEDED}
        if failed:
            lines = [
                f"  {n}: cancelled by `ddm cancel` after {o.attempts} attempt(s)" if o.state == CANCELLED
                else f"  {n}: failed after {o.attempts} attempt(s): {(o.error or '').strip()[:2000]}"
                for n, o in failed.items()
            ]  # fmt: skip
            raise RunFailed(
                "jobs failed or were cancelled (the others finished; fix the cause and run again to retry, "
                "or to resume a cancelled job):\n" + "\n".join(lines)
            )

    def expert_jobs(self) -> list:
        """One JobSpec per expert, on its island (writes each job's config unless ``dry_run``)."""
        names = expert_names(self.cfg)
        self.islands.check_experts(len(names))
        jobs = []
        for k, name in enumerate(names):
            job_cfg = self.expert_job(name)
            jobs.append(self._job(name, job_cfg, job_cfg.output, self.islands.island_for(k), components.trainer,
                                  lambda n=name: expert_is_complete(self.cfg, n)))  # fmt: skip
        return jobs

    def stage_experts(self) -> dict[str, Any]:
        self._launch(self.expert_jobs(), self.cfg.experts.max_attempts)
        return {"experts": expert_names(self.cfg)}

    def router_skipped(self) -> str | None:
        """Why this run trains no router, or None when it does."""
        if self.cfg.mode == "monolith" or not self.cfg.router.enabled:
            return "monolith mode" if self.cfg.mode == "monolith" else "router.enabled = false"
        if self.cfg.partition.k < 2:
            return "one partition: nothing to route"
        return None

    def router_jobs(self) -> list:
        """The router's JobSpec (empty when the run trains no router)."""
        if self.router_skipped():
            return []
        island = self.cfg.router.island or self.islands.default
        if island not in self.islands.island:
            raise ValueError(f"router.island {island!r} is not defined in the islands file")
        return [self._job("router", self.router_job(), router_output(self.cfg), island, components.trainer,
                          lambda: router_is_complete(self.cfg))]  # fmt: skip

    def router_job(self) -> Any:
        from ddm.router.config import RouterDataConfig, RouterJobConfig

        r = self.cfg.router
        return RouterJobConfig(
            name="router", output=router_output(self.cfg), data=RouterDataConfig(root=self.cfg.root, k=self.cfg.partition.k),
            model=r.model, train=r.train, eval=r.eval,
        )  # fmt: skip

    def stage_router(self) -> dict[str, Any]:
        skipped = self.router_skipped()
        if skipped:
            return {"skipped": skipped}
        self._launch(self.router_jobs(), self.cfg.experts.max_attempts)
        acc_url = storage.join(router_output(self.cfg), "accuracy_vs_t.json")
        return {"accuracy_vs_t": acc_url if storage.exists(acc_url) else None}

    def stage_distill(self) -> dict[str, Any]:
        from ddm.coordinator.distill_stage import run_distill_stage

        return run_distill_stage(self)

    def stage_eval(self) -> dict[str, Any]:
        if not self.cfg.eval.enabled:
            return {"skipped": "eval.enabled = false"}
        from ddm.coordinator.eval_stage import run_eval

        dirs = {n: expert_output(self.cfg, n) for n in expert_names(self.cfg)}
        router = None
        if self.cfg.mode == "experts" and self.manifest.stage("router").get("skipped") is None:
            router = checkpoint.latest(storage.join(router_output(self.cfg), "checkpoints"))
        return run_eval(self.cfg, dirs, router, progress=self.progress, say=self.say, placement=self.where())

    def _job_progress(self, states: dict[str, str]) -> None:
        from ddm.core import heartbeat

        parts = []
        for name, state in states.items():
            beat = heartbeat.read(job_output(self.cfg.root, name)) if state in ("SUBMITTED", "RUNNING") else None
            step = f" {beat['step']}/{beat['steps']}" if beat else ""
            parts.append(f"{name}={state}{step}")
        line = "  ".join(parts)
        if line != getattr(self, "_last_line", None):
            self._last_line = line
            self.say(f"[jobs] {line}")


def latest_checkpoints(cfg: RunConfig) -> dict[str, str | None]:
    return {n: checkpoint.latest(storage.join(expert_output(cfg, n), "checkpoints")) for n in expert_names(cfg)}


# small helpers --------------------------------------------------------------------------------------
def _cwd() -> str:
    import os

    return os.getcwd()


def _absolute(url: str) -> str:
    import os

    return url if "://" in url else os.path.abspath(url)


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _load_npy(raw: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(raw), allow_pickle=False)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
