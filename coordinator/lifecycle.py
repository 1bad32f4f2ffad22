"""Expert lifecycle on a finished run: add an expert for new data, retire one whose data must go.

Experts are trained in isolation, so neither touches the other experts: ``add_expert`` curates the new
data like the run's (the run's encoder and curation settings), writes it as a new partition, trains one
new expert on its island through the launcher (a job of the run's manifest like any other) and
fine-tunes the router with one more output, started from the old router (``ddm.router.grow``).
``retire_expert`` takes an expert out of serving and retrains the router from scratch on the remaining
partitions only (nothing trained on the retired data survives in the router), marks a student distilled
with it stale, and with ``purge`` deletes the retired partition's shards and the expert's weights.

Every change is recorded in the manifest's lineage (``ddm.coordinator.lineage``): generations, data
provenance, the router each serves with. ``ddm serve run ROOT`` serves what the lineage says.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from ddm.coordinator import lineage
from ddm.coordinator.layout import expert_output, job_output, trained_to
from ddm.coordinator.manifest import Manifest
from ddm.core import storage
from ddm.core.config import Strict
from ddm.expert.config import DataConfig


class LifecycleError(ValueError):
    pass


class LifecycleConfig(Strict):
    """Settings of ``ddm add-expert`` / ``ddm retire-expert`` (CLI options come from these fields)."""

    island: str | None = Field(None, description="island the new expert trains on")
    router_steps: int | None = Field(None, ge=1, description="router training steps after the change")
    purge: bool = Field(
        False, description="retire: also delete the retired partition's shards and the expert's checkpoints"
    )
    router_from: Literal["previous", "scratch"] = Field(
        "previous",
        description="add: start the K+1 router from the previous one ('previous') or train it from scratch",
    )


def _open(root: str, say: Callable[[str], None], device: str | None = None) -> Any:
    """The run's Pipeline (config, islands, manifest) with its lineage backfilled; refuses a run whose
    experts and router are not done."""
    from ddm.coordinator.config import RunConfig
    from ddm.coordinator.islands import load_islands
    from ddm.coordinator.pipeline import Pipeline
    from ddm.core import checkpoint
    from ddm.core.placement import Placement

    manifest = Manifest.load(root)
    cfg = RunConfig.model_validate(manifest.data["config"])
    if cfg.mode != "experts":
        raise LifecycleError(f"{root}: a {cfg.mode} run has no experts to add or retire")
    missing = [s for s in ("partition", "experts", "router") if not manifest.stage_done(s)]
    if missing:
        raise LifecycleError(
            f"{root}: stage(s) {', '.join(missing)} not done; finish the run with `ddm run` first"
        )
    lineage.backfill_trained(
        manifest.data, cfg, lambda n: checkpoint.latest(storage.join(expert_output(cfg, n), "checkpoints"))
    )
    manifest.save()
    placement = Placement.resolve(device or cfg.device, field="--device" if device else "device")
    return Pipeline(cfg, load_islands(cfg.islands), manifest, progress=False, say=say, placement=placement)


def _router_job(ctx: Any, partitions: list[str], output: str, init: Any, steps: int | None) -> Any:
    from ddm.router.config import RouterDataConfig, RouterJobConfig

    r = ctx.cfg.router
    train = r.train if steps is None else r.train.model_copy(update={"steps": steps})
    return RouterJobConfig(
        name=output.rsplit("/", 1)[-1], output=output, data=RouterDataConfig(partitions=partitions),
        model=r.model, train=train, eval=r.eval, init=init,
    )  # fmt: skip


def _train_router(ctx: Any, experts: list[str], init: Any, steps: int | None) -> dict[str, Any]:
    """Train the router over ``experts`` (their partitions, in order) into ``router/gen-G`` as job
    ``router-gen-G``; record it as the run's router; returns its lineage record."""
    from ddm.coordinator import components
    from ddm.core import checkpoint

    data = ctx.manifest.data
    gen = lineage.section(data)["router"].get("generation", 1) + 1
    name = f"router-gen-{gen}"
    output = job_output(ctx.cfg.root, name)
    partitions = [storage.join(ctx.cfg.root, "partitions", e) for e in experts]
    job_cfg = _router_job(ctx, partitions, output, init, steps)
    island = ctx.cfg.router.island or ctx.islands.default
    spec = ctx.job(name, job_cfg, output, island, components.trainer,
                   lambda: trained_to(output, job_cfg.train.steps) and storage.exists(storage.join(output, "accuracy_vs_t.json")))  # fmt: skip
    ctx.say(f"[lifecycle] training {name} over {', '.join(experts)} ({job_cfg.train.steps} steps"
            f"{', from the previous router' if init else ', from scratch'})")  # fmt: skip
    ctx.launch([spec], ctx.cfg.experts.max_attempts)
    ckpt = checkpoint.latest(storage.join(output, "checkpoints"))
    return lineage.record_router(
        data, output, experts, job=name, checkpoint=ckpt, initialised_from=init and init.checkpoint
    )


def _current_router(ctx: Any) -> str:
    from ddm.core import checkpoint

    url = checkpoint.latest(storage.join(lineage.router_dir(ctx.cfg.root, ctx.manifest.data), "checkpoints"))
    if url is None:
        raise LifecycleError(f"{ctx.cfg.root}: the run's router has no checkpoint")
    return url


def _student(root: str) -> str | None:
    from ddm.core import checkpoint

    return checkpoint.latest(storage.join(root, "distill", "checkpoints"))


def add_expert(
    root: str,
    data_cfg: DataConfig,
    settings: LifecycleConfig,
    *,
    say: Callable[[str], None] = print,
    device: str | None = None,
) -> dict[str, Any]:
    """Add one expert trained on ``data_cfg`` (curated as the run's data) and a router with one more
    output; returns the event recorded in the lineage (with the jobs' compute)."""
    import numpy as np
    import torch

    from ddm.coordinator import components
    from ddm.coordinator.curate import curate, embed_dataset
    from ddm.coordinator.stages import EXPERTS
    from ddm.core import checkpoint
    from ddm.expert.data import build_dataset
    from ddm.expert.shards import write_shards

    started = time.time()
    ctx = _open(root, say, device)
    cfg, data = ctx.cfg, ctx.manifest.data
    source = data_cfg.model_copy(update={"image_size": cfg.data.image_size, "channels": cfg.data.channels})
    pending = _pending(data, "add-expert", source=source.model_dump(mode="json"))
    if pending:  # an earlier add-expert of this data stopped part-way: finish it under the same name
        name, index = pending["expert"], pending["partition_index"]
        say(f"[lifecycle] resuming the unfinished add of {name}")
    else:
        index = lineage.next_partition_index(cfg, data)
        name = f"expert-{index}"
        lineage.section(data)["pending"] = {"op": "add-expert", "expert": name, "partition_index": index,
                                            "source": source.model_dump(mode="json"), "at": time.time()}  # fmt: skip
        ctx.manifest.save()
    island = settings.island or ctx.islands.island_for(index)
    if island not in ctx.islands.island:
        raise LifecycleError(
            f"--island {island!r} is not defined in the islands file ({', '.join(ctx.islands.island)})"
        )
    new = build_dataset(source)
    if new.num_classes > cfg.experts.model.num_classes:
        raise LifecycleError(
            f"--data has {new.num_classes} classes but the run's experts have {cfg.experts.model.num_classes}"
        )
    part_url = storage.join(cfg.root, "partitions", name)
    if not storage.exists(
        storage.join(part_url, "index.json")
    ):  # a rerun after a failure keeps the partition
        feats = embed_dataset(new, cfg.partition, storage.join(cfg.root, "lifecycle", name, "embeddings.safetensors"),
                              progress=False, placement=ctx.where())  # fmt: skip
        kept = curate(new, feats, cfg.curate)
        keep = torch.from_numpy(np.asarray(kept.keep, dtype=np.int64))
        if len(keep) < 2:
            raise LifecycleError(
                f"--data: only {len(keep)} image(s) left after curation; an expert needs more"
            )
        storage.write_json(storage.join(cfg.root, "lifecycle", name, "curate.json"), {
            "images": len(new), "kept": len(keep), "exact_duplicates": kept.exact_duplicates,
            "near_duplicates": kept.near_duplicates, "degenerate_embeddings": kept.degenerate})  # fmt: skip
        write_shards(part_url, new.images[keep], new.labels[keep], new.ids[keep],
                     num_classes=cfg.experts.model.num_classes, shard_size=cfg.partition.shard_size,
                     meta={"cluster": index, "run": cfg.name, "source": source.model_dump(mode="json"),
                           "lifecycle": lineage.ADDED})  # fmt: skip
        say(f"[lifecycle] {name}: {len(keep)}/{len(new)} new images kept after curation -> {part_url}")
    expert_job = EXPERTS.expert_job(cfg, name)
    out = expert_output(cfg, name)
    spec = ctx.job(name, expert_job, out, island, components.trainer,
                   lambda: trained_to(out, cfg.experts.train.steps))  # fmt: skip
    say(f"[lifecycle] training {name} on island {island}")
    ctx.launch([spec], cfg.experts.max_attempts)
    lineage.record_generation(
        data, cfg.root, name, lineage.ADDED, partition_index=index,
        provenance=lineage.provenance(part_url, source.model_dump(mode="json")),
        checkpoint=checkpoint.latest(storage.join(out, "checkpoints")),
    )  # fmt: skip
    ctx.manifest.save()
    old = lineage.router_dir(cfg.root, data)
    serving = lineage.active_experts(data)  # the new one last (the highest index)
    init = None
    if settings.router_from == "previous":
        from ddm.router.config import RouterInitConfig
        from ddm.router.grow import NEW

        old_order = lineage.section(data)["router"]["experts"]
        init = RouterInitConfig(
            checkpoint=_current_router(ctx),
            expert_map=[old_order.index(e) if e in old_order else NEW for e in serving],
        )
    router = _train_router(ctx, serving, init, settings.router_steps)
    lineage.mark_student_stale(data, f"distilled without {name} (added later)", _student(cfg.root))
    event = {"expert": name, "island": island, "router": router["output"], "previous_router": old,
             "compute": compute(ctx.manifest.data, [name, router["job"]], serving), "seconds": round(time.time() - started, 1)}  # fmt: skip
    lineage.add_event(data, "add-expert", **event)
    lineage.section(data).pop("pending", None)
    ctx.manifest.save()
    say(f"[lifecycle] {name} added (generation 1); router generation {router['generation']} serves "
        f"{', '.join(serving)}")  # fmt: skip
    return event


def retire_expert(
    root: str, name: str, settings: LifecycleConfig, *, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Take ``name`` out of serving, retrain the router from scratch on the remaining partitions, mark a
    student distilled with it stale; with ``settings.purge`` delete its shards and weights."""
    ctx = _open(root, say)
    cfg, data = ctx.cfg, ctx.manifest.data
    experts = lineage.section(data)["experts"]
    if name not in experts:
        raise LifecycleError(f"{name!r} is not an expert of {root}; experts: {', '.join(experts)}")
    rec = experts[name]
    _pending(data, "retire-expert", expert=name)  # refuses while another command is unfinished
    active = lineage.active_experts(data)
    if name in active:
        remaining = [e for e in active if e != name]
        if len(remaining) < 2:
            raise LifecycleError(
                f"retiring {name} would leave {len(remaining)} expert(s); a routed ensemble needs 2 "
                "(add an expert first with `ddm add-expert`)"
            )
        lineage.section(data)["pending"] = {"op": "retire-expert", "expert": name, "at": time.time()}
        lineage.record_generation(
            data, cfg.root, name, lineage.RETIRED, partition_index=rec["partition_index"], provenance=None,
            checkpoint=rec.get("checkpoint"), active=False,
        )  # fmt: skip
        ctx.manifest.save()
        say(f"[lifecycle] {name} retired: it leaves serving with the router trained without it")
    else:
        remaining = active
        say(f"[lifecycle] {name} was already retired; finishing what is left to do")
    if settings.purge:
        purge(cfg.root, name)
        experts[name]["purged_at"] = time.time()
        say(f"[lifecycle] {name}: partition shards and checkpoints deleted")
    if name in lineage.section(data)["router"].get("experts", []):
        _train_router(ctx, remaining, None, settings.router_steps)
    student = _student(cfg.root)
    lineage.mark_student_stale(data, f"distilled with {name}, now retired", student)
    router = lineage.section(data)["router"]
    lineage.add_event(data, "retire-expert", expert=name, purged=settings.purge, router=router["output"],
                      compute=compute(data, [router.get("job", "router")], remaining))  # fmt: skip
    lineage.section(data).pop("pending", None)
    ctx.manifest.save()
    return lineage.section(data)["events"][-1]


def _pending(data: dict[str, Any], op: str, **same: Any) -> dict[str, Any] | None:
    """The unfinished lifecycle command this one resumes (same op and arguments), None when there is
    none; a LifecycleError when a different one is unfinished (one change at a time)."""
    pending = lineage.section(data).get("pending")
    if not pending:
        return None
    if pending["op"] == op and all(pending.get(k) == v for k, v in same.items()):
        return pending
    what = pending.get("expert")
    raise LifecycleError(
        f"an earlier `ddm {pending['op']}` of {what} did not finish; rerun it with the same arguments to "
        f"finish it before `ddm {op}`"
    )


def purge(root: str, name: str) -> None:
    """Delete the partition shards and checkpoints of ``name`` (the lineage keeps their hashes). The
    partition's index goes first, so a reader meanwhile sees an incomplete partition, never a partial one."""
    part = storage.join(root, "partitions", name)
    storage.remove(storage.join(part, "index.json"))
    for url in (part, storage.join(job_output(root, name), "checkpoints")):
        for file in storage.listdir(url):
            storage.remove(storage.join(url, file))


def compute(data: dict[str, Any], jobs: list[str], experts: list[str]) -> dict[str, Any]:
    """Wall seconds (submit to end of each attempt, from the manifest's job records) of the ``jobs`` a
    lifecycle command ran, against a full retrain of the run it leaves: a job per expert of ``experts``
    (each at its recorded seconds) and the run's first router job. Jobs that ran side by side each count
    their own seconds (job-seconds, not the coordinator's wall time)."""
    records = data.get("jobs", {})

    def wall(name: str) -> float:
        return round(sum(a["ended_at"] - a["submitted_at"] for a in records.get(name, {}).get("attempts", [])
                         if a.get("ended_at") is not None and a.get("submitted_at") is not None), 1)  # fmt: skip

    spent = round(sum(wall(n) for n in jobs), 1)
    full = round(sum(wall(n) for n in experts) + wall("router"), 1)
    return {"jobs": {n: wall(n) for n in jobs}, "spent_seconds": spent, "full_retrain_seconds": full,
            "ratio": round(spent / full, 3) if full else None}  # fmt: skip


def main_error(command: str, e: Exception) -> int:
    print(f"ddm {command}: {e}", file=sys.stderr)
    return 2
