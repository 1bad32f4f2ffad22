"""The six stages of ``ddm run``, each one small object with the same shape, in one tuple (``ALL``).

A stage says what it needs (earlier stages), whether the config skips it (``skipped(cfg)``: the reason,
or None), whether the manifest records it done, which TorchX jobs it runs (``job_names(cfg)`` for
``ddm status``; ``jobs(ctx)`` builds their JobSpecs for the dry run and the launcher), how it runs
(``run(ctx) -> dict``: what the manifest records beside its state) and its headline figures for the
stage table (``headline(record)``). ``ddm run`` (pipeline.Pipeline), ``ddm run --dry-run`` (dryrun.py)
and ``ddm status`` (status_cmd.py) all ask these objects, so the skip rules live here once.

``ctx`` is the run's :class:`ddm.coordinator.pipeline.Pipeline`: ``cfg``, ``islands``, ``manifest``,
``say``, ``progress``, ``dry_run``, ``where()`` (the coordinator's device), ``data()`` (the dataset,
read once), ``job(...)`` (a JobSpec with its config written) and ``launch(jobs)``.

Importing this module loads no torch, numpy, faiss or TorchX: each ``run`` imports what it uses.
"""

from __future__ import annotations

from typing import Any

from ddm.coordinator.layout import (
    expert_is_complete,
    expert_names,
    expert_output,
    router_is_complete,
    router_output,
)
from ddm.core import storage


class Stage:
    name: str = ""
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads

    def skipped(self, cfg: Any) -> str | None:
        """Why ``cfg`` skips this stage, or None when it runs."""
        return None

    def done(self, manifest: Any) -> bool:
        return manifest.stage_done(self.name)

    def job_names(self, cfg: Any) -> list[str]:
        """The TorchX jobs this stage runs (none for the stages that run in the coordinator)."""
        return []

    def jobs(self, ctx: Any) -> list:
        """The JobSpecs of ``job_names``, on their islands (job configs written unless ``ctx.dry_run``)."""
        return []

    def run(self, ctx: Any) -> dict[str, Any]:
        raise NotImplementedError

    def headline(self, record: dict[str, Any]) -> str:
        """The figures a person wants from this stage's manifest record, on one line."""
        return ""

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


class Curate(Stage):
    """Embed every image, drop exact and near duplicates and blank embeddings: ``curate/keep.npy``."""

    name = "curate"

    def skipped(self, cfg: Any) -> str | None:
        return "monolith mode trains on the whole dataset" if cfg.mode == "monolith" else None

    def run(self, ctx: Any) -> dict[str, Any]:
        from ddm.coordinator.curate import curate, embed_dataset, save_pairs_png

        data = ctx.data()
        feats = embed_dataset(data, ctx.cfg.partition, storage.join(ctx.cfg.root, "curate", "embeddings.safetensors"),
                              progress=ctx.progress, placement=ctx.where())  # fmt: skip
        result = curate(data, feats, ctx.cfg.curate)
        report = {
            "images": len(data),
            "kept": int(len(result.keep)),
            "exact_duplicates": result.exact_duplicates,
            "near_duplicates": result.near_duplicates,
            "degenerate_embeddings": result.degenerate,
            "near_duplicate_cosine": ctx.cfg.curate.near_duplicate_cosine,
            "skipped_unreadable": len(getattr(data, "skipped", []) or []),
            "example_pairs": [
                {"removed": int(a), "kept": int(b), "cosine": round(c, 4)} for a, b, c in result.pairs
            ],
        }
        storage.write_bytes(storage.join(ctx.cfg.root, "curate", "keep.npy"), npy(result.keep))
        storage.write_json(storage.join(ctx.cfg.root, "curate", "report.json"), report)
        save_pairs_png(data, result.pairs, storage.join(ctx.cfg.root, "curate", "near_duplicates.png"))
        ctx.say(
            f"[curate] {report['images']} images: {report['exact_duplicates']} exact and "
            f"{report['near_duplicates']} near duplicates and {report['degenerate_embeddings']} blank embeddings removed, "
            f"{report['skipped_unreadable']} unreadable skipped, {report['kept']} kept"
        )
        return {
            k: report[k]
            for k in (
                "images",
                "kept",
                "exact_duplicates",
                "near_duplicates",
                "degenerate_embeddings",
                "skipped_unreadable",
            )
        }

    def headline(self, record: dict[str, Any]) -> str:
        if "kept" not in record:
            return ""
        return f"{record['kept']}/{record['images']} images kept"


class Partition(Stage):
    """Cluster the kept embeddings (fine k-means, grouped into K) and write one shard set per expert."""

    name = "partition"
    needs = ("curate",)

    def skipped(self, cfg: Any) -> str | None:
        return "monolith mode trains on the whole dataset" if cfg.mode == "monolith" else None

    def run(self, ctx: Any) -> dict[str, Any]:
        import numpy as np
        import torch

        from ddm.coordinator.cluster import ClusterConfig, cluster_report, fit_clustering
        from ddm.coordinator.curate import embed_dataset
        from ddm.expert.images import save_grid
        from ddm.expert.shards import ShardWriter, write_shards

        data = ctx.data()
        keep = torch.from_numpy(
            load_npy(storage.read_bytes(storage.join(ctx.cfg.root, "curate", "keep.npy")))
        )
        feats = embed_dataset(data, ctx.cfg.partition, storage.join(ctx.cfg.root, "curate", "embeddings.safetensors"),
                              progress=ctx.progress, placement=ctx.where())  # fmt: skip
        p = ctx.cfg.partition
        ccfg = ClusterConfig(**{**p.cluster_settings(), "fine_k": min(p.fine_k, len(keep))})
        clustering, labels = fit_clustering(feats[keep.numpy()], ccfg)
        clustering.save(storage.join(ctx.cfg.root, "clusters", "clustering"))
        report = cluster_report(labels, p.k)
        sizes = [int(s) for s in np.bincount(labels, minlength=p.k)]
        per_class = [
            np.bincount(data.labels[keep][labels == k].numpy(), minlength=max(data.num_classes, 1)).tolist()
            for k in range(p.k)
        ]
        storage.write_json(
            storage.join(ctx.cfg.root, "clusters", "report.json"),
            {**jsonable(report), "sizes": sizes, "class_counts": per_class, "class_names": data.class_names},
        )
        # A few images per cluster, one row each, so a person sees what each expert will learn.
        rows = []
        gen = np.random.default_rng(p.seed)
        for k in range(p.k):
            members = keep[torch.from_numpy(np.flatnonzero(labels == k))]
            pick = members[
                torch.from_numpy(gen.choice(len(members), size=min(12, len(members)), replace=False))
            ]
            rows.append(
                torch.cat(
                    [
                        data.images[pick],
                        torch.full((12 - len(pick), *data.images.shape[1:]), 255, dtype=torch.uint8),
                    ]
                )
            )
        save_grid(torch.cat(rows), storage.join(ctx.cfg.root, "clusters", "samples.png"), nrow=12)
        latents = None
        if ctx.cfg.latent.enabled:  # encode every kept image once (cached, resumable), write latents
            from ddm.coordinator.latents import encode_dataset

            latents = encode_dataset(data, ctx.cfg.latent, storage.join(ctx.cfg.root, "latents"),
                                     device=ctx.where().device, say=ctx.say)  # fmt: skip
        for k, name in enumerate(expert_names(ctx.cfg)):
            members = keep[torch.from_numpy(np.flatnonzero(labels == k))]
            meta = {"cluster": k, "run": ctx.cfg.name, "source": ctx.cfg.data.model_dump()}
            url = storage.join(ctx.cfg.root, "partitions", name)
            if latents is None:
                write_shards(url, data.images[members], data.labels[members], data.ids[members],
                             num_classes=data.num_classes, shard_size=p.shard_size, meta=meta)  # fmt: skip
                continue
            writer = ShardWriter(url, image_shape=tuple(latents.record["latent_shape"]), num_classes=data.num_classes,
                                 shard_size=p.shard_size, meta={**meta, "latent": latents.record}, dtype="float16")  # fmt: skip
            for b in range(0, len(members), p.shard_size):
                rows = members[b : b + p.shard_size]
                writer.add(latents.normalized(rows), data.labels[rows], data.ids[rows])
            writer.close()
        ctx.say(f"[partition] cluster sizes {sizes} (imbalance {max(sizes) / max(1, min(sizes)):.3f})")
        return {"sizes": sizes, **({"latent": latents.record} if latents is not None else {})}

    def headline(self, record: dict[str, Any]) -> str:
        sizes = record.get("sizes")
        if not sizes:
            return ""
        return f"cluster sizes {sizes} (imbalance {max(sizes) / max(1, min(sizes)):.2f})"


class Experts(Stage):
    """One training job per expert (or the monolith), each on its island, on its own partition only."""

    name = "experts"
    needs = ("partition",)

    def job_names(self, cfg: Any) -> list[str]:
        return expert_names(cfg)

    def expert_job(self, cfg: Any, name: str) -> Any:
        from ddm.expert.config import DataConfig, ExpertJobConfig

        if cfg.mode == "monolith":
            data = cfg.data
        else:
            part = storage.join(cfg.root, "partitions", name)
            data = DataConfig(
                source="shards", path=part, image_size=cfg.data.image_size, channels=cfg.data.channels
            )
        return ExpertJobConfig(
            name=name,
            output=expert_output(cfg, name),
            data=data,
            model=cfg.expert_model(name),
            train=cfg.experts.train,
        )

    def jobs(self, ctx: Any) -> list:
        from ddm.coordinator import components

        names = expert_names(ctx.cfg)
        ctx.islands.check_experts(len(names))
        return [
            ctx.job(
                name,
                self.expert_job(ctx.cfg, name),
                expert_output(ctx.cfg, name),
                ctx.islands.island_for(k),
                components.trainer,
                lambda n=name: expert_is_complete(ctx.cfg, n),
            )  # fmt: skip
            for k, name in enumerate(names)
        ]

    def run(self, ctx: Any) -> dict[str, Any]:
        ctx.launch(self.jobs(ctx), ctx.cfg.experts.max_attempts)
        if ctx.cfg.mode == "experts":  # generation 1 of each, with its data's provenance (lineage.py)
            from ddm.coordinator.lineage import backfill_trained
            from ddm.core import checkpoint

            backfill_trained(ctx.manifest.data, ctx.cfg,
                             lambda n: checkpoint.latest(storage.join(expert_output(ctx.cfg, n), "checkpoints")))  # fmt: skip
        return {"experts": expert_names(ctx.cfg)}

    def headline(self, record: dict[str, Any]) -> str:
        return f"{len(record['experts'])} trained" if record.get("experts") else ""


class Router(Stage):
    """The router p(k | x_t, t, c), trained as its own job on the partition labels."""

    name = "router"
    needs = ("partition",)

    def skipped(self, cfg: Any) -> str | None:
        if cfg.mode == "monolith":
            return "monolith mode"
        if not cfg.router.enabled:
            return "router.enabled = false"
        if cfg.partition.k < 2:
            return "one partition: nothing to route"
        return None

    def job_names(self, cfg: Any) -> list[str]:
        return [] if self.skipped(cfg) else ["router"]

    def router_job(self, cfg: Any) -> Any:
        from ddm.router.config import RouterDataConfig, RouterJobConfig

        r = cfg.router
        return RouterJobConfig(
            name="router", output=router_output(cfg), data=RouterDataConfig(root=cfg.root, k=cfg.partition.k),
            model=r.model, train=r.train, eval=r.eval,
        )  # fmt: skip

    def jobs(self, ctx: Any) -> list:
        from ddm.coordinator import components

        if self.skipped(ctx.cfg):
            return []
        island = ctx.cfg.router.island or ctx.islands.default
        if island not in ctx.islands.island:
            raise ValueError(f"router.island {island!r} is not defined in the islands file")
        output = router_output(ctx.cfg)
        return [
            ctx.job(
                "router",
                self.router_job(ctx.cfg),
                output,
                island,
                components.trainer,
                lambda: router_is_complete(ctx.cfg),
            )
        ]

    def run(self, ctx: Any) -> dict[str, Any]:
        ctx.launch(self.jobs(ctx), ctx.cfg.experts.max_attempts)
        acc_url = storage.join(router_output(ctx.cfg), "accuracy_vs_t.json")
        return {"accuracy_vs_t": acc_url if storage.exists(acc_url) else None}


def router_checkpoint(cfg: Any, data: dict[str, Any] | None = None) -> str | None:
    """The router the eval and distill stages use: its newest checkpoint (the lineage's router after an
    add-expert or retire-expert, given the manifest ``data``), None when the run has none."""
    from ddm.coordinator.lineage import router_dir
    from ddm.core import checkpoint

    if ROUTER.skipped(cfg):
        return None
    out = router_dir(cfg.root, data) if data is not None else router_output(cfg)
    return checkpoint.latest(storage.join(out, "checkpoints"))


def serving_expert_dirs(ctx: Any) -> dict[str, str]:
    """Output folders of the experts the run serves now, in router order: the K trained ones, or what
    the lineage says after ``ddm add-expert`` / ``ddm retire-expert`` (a retired expert's partition and
    weights are read by no stage)."""
    from ddm.coordinator.lineage import serving_experts

    data = ctx.manifest.data if ctx.manifest is not None else {}
    return {n: expert_output(ctx.cfg, n) for n in serving_experts(ctx.cfg, data)}


class Eval(Stage):
    """FD, KID, precision/recall and class accuracy of the run's models (eval_stage.py)."""

    name = "eval"
    needs = ("experts", "router")

    def skipped(self, cfg: Any) -> str | None:
        return None if cfg.eval.enabled else "eval.enabled = false"

    def run(self, ctx: Any) -> dict[str, Any]:
        from ddm.coordinator.eval_stage import run_eval

        dirs = serving_expert_dirs(ctx)
        router = router_checkpoint(ctx.cfg, ctx.manifest.data) if ctx.cfg.mode == "experts" else None
        return run_eval(ctx.cfg, dirs, router, progress=ctx.progress, say=ctx.say, placement=ctx.where())

    def headline(self, record: dict[str, Any]) -> str:
        fds = [f"{name} FD {r['fd']:.2f}" for name, r in record.items() if isinstance(r, dict) and "fd" in r]
        return ", ".join(fds)


class Distill(Stage):
    """A dense student of the experts, trained as its own job, then the distillation table."""

    name = "distill"
    needs = ("experts", "router")

    def skipped(self, cfg: Any) -> str | None:
        if cfg.mode == "monolith":
            return "monolith mode"
        if not cfg.distill.enabled:
            return "distill.enabled = false"
        if cfg.partition.k < 2:
            return "one partition: the run is already one model"
        return None

    def job_names(self, cfg: Any) -> list[str]:
        return [] if self.skipped(cfg) else ["distill"]

    def jobs(self, ctx: Any) -> list:
        """The student's job. The router checkpoint it names is the newest one; in a dry run, before the
        router exists, its checkpoints directory."""
        from ddm.coordinator.distill_stage import distill_job_spec

        if self.skipped(ctx.cfg):
            return []
        if ctx.dry_run:
            router_url = (
                None if ROUTER.skipped(ctx.cfg) else storage.join(router_output(ctx.cfg), "checkpoints")
            )
        else:
            router_url = router_checkpoint(ctx.cfg, ctx.manifest.data)
        return [distill_job_spec(ctx, router_url)]

    def run(self, ctx: Any) -> dict[str, Any]:
        from ddm.coordinator.distill_stage import run_distill_stage

        return run_distill_stage(ctx, self.jobs(ctx))

    def headline(self, record: dict[str, Any]) -> str:
        if record.get("fd_ratio_4step") is None:
            return "student trained" if record.get("student") else ""
        return (
            f"student/ensemble at 4 steps: FD x{record['fd_ratio_4step']}, time x{record['time_ratio_4step']}"
        )


CURATE, PARTITION, EXPERTS, ROUTER, EVAL, DISTILL = (
    Curate(),
    Partition(),
    Experts(),
    Router(),
    Eval(),
    Distill(),
)
ALL: tuple[Stage, ...] = (CURATE, PARTITION, EXPERTS, ROUTER, EVAL, DISTILL)
NAMES: tuple[str, ...] = tuple(s.name for s in ALL)
BY_NAME: dict[str, Stage] = {s.name: s for s in ALL}


# small helpers --------------------------------------------------------------------------------------
def npy(a: Any) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def load_npy(raw: bytes) -> Any:
    import io

    import numpy as np

    return np.load(io.BytesIO(raw), allow_pickle=False)


def jsonable(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj
