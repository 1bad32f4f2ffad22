"""Expert generations: which experts a run serves now, and where each one's data and weights came from.

The manifest's ``lineage`` section (written only through :class:`ddm.coordinator.manifest.Manifest`, so
every change is one compare-and-swap of the manifest)::

    "lineage": {
      "experts": {
        "expert-0": {"generation": 1, "lifecycle": "trained", "partition_index": 0, "active": true,
                     "data": {"source": {...}, "partition": URL, "shards": [{file, count, sha256}]},
                     "checkpoint": URL, "at": T, "history": [<earlier generations>]},
        ...},
      "router": {"generation": 2, "output": "ROOT/router/gen-2", "experts": ["expert-0", ...], ...},
      "student": {"stale": true, "reason": "...", "distilled_with": [...]},
      "events": [{"at": T, "op": "add-expert", "expert": "expert-2", ...}]
    }

A run without the section (every run ``ddm run`` made before its first lifecycle command) reads as its
K trained experts, generation 1 each, and the router under ``ROOT/router``. Each expert's output folder
also holds ``generation.json`` ({name, generation, lifecycle}), which is what an expert server reads
(``ddm.expert.generation``): a server needs no manifest.

Torch-free: ``ddm status`` reads it.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from ddm.coordinator.layout import expert_names, job_output
from ddm.core import storage

TRAINED, ADDED, CONTINUED, REPLACED, RETIRED = "trained", "added", "continued", "replaced", "retired"
LIFECYCLES = (TRAINED, ADDED, CONTINUED, REPLACED, RETIRED)
GENERATION_FILE = "generation.json"


def section(data: dict[str, Any]) -> dict[str, Any]:
    """The manifest data's lineage section, created empty if absent (the caller saves the manifest)."""
    lin = data.setdefault("lineage", {})
    for key, empty in (("experts", {}), ("router", {}), ("student", {}), ("events", [])):
        lin.setdefault(key, empty)
    return lin


def has_lineage(data: dict[str, Any]) -> bool:
    return bool(data.get("lineage", {}).get("experts"))


def serving_experts(cfg: Any, data: dict[str, Any]) -> list[str]:
    """The experts the run serves now, in router output order: the experts of the lineage's router (an
    expert joins when a router with an output for it is trained, and leaves when one without it is);
    without a lineage the run's K trained experts."""
    return list(data.get("lineage", {}).get("router", {}).get("experts") or expert_names(cfg))


def active_experts(data: dict[str, Any]) -> list[str]:
    """The experts the lineage has not retired, by partition index (what the next router covers)."""
    experts = data.get("lineage", {}).get("experts", {})
    active = [(rec["partition_index"], name) for name, rec in experts.items() if rec.get("active", True)]
    return [name for _, name in sorted(active)]


def all_experts(cfg: Any, data: dict[str, Any]) -> list[str]:
    """Every expert the run ever had (retired ones too), by partition index."""
    experts = data.get("lineage", {}).get("experts")
    if not experts:
        return expert_names(cfg)
    return [name for _, name in sorted((rec["partition_index"], name) for name, rec in experts.items())]


def router_dir(root: str, data: dict[str, Any]) -> str:
    """The output folder of the router the run serves now: ``ROOT/router`` until a lifecycle command
    trained a new one (``ROOT/router/gen-N``)."""
    return data.get("lineage", {}).get("router", {}).get("output") or job_output(root, "router")


def next_partition_index(cfg: Any, data: dict[str, Any]) -> int:
    """The index a new expert gets: one past every expert the run ever had (retired indexes stay taken,
    so a name always means one partition)."""
    names = all_experts(cfg, data)
    return 1 + max(int(n.rsplit("-", 1)[1]) for n in names) if names else 0


def provenance(partition_url: str, source: Any) -> dict[str, Any]:
    """Where an expert's data came from: the source it was read from, the partition folder and each
    shard's content hash (from the partition's ``index.json``, written with the shards)."""
    index = storage.read_json(storage.join(partition_url, "index.json"))
    shards = [{"file": s["file"], "count": s["count"], "sha256": s["sha256"]} for s in index["shards"]]
    return {"source": source, "partition": partition_url, "count": index["count"], "shards": shards}


def record_generation(
    data: dict[str, Any],
    root: str,
    name: str,
    lifecycle: str,
    *,
    partition_index: int,
    provenance: dict[str, Any] | None,
    checkpoint: str | None,
    active: bool = True,
    note: str | None = None,
) -> dict[str, Any]:
    """Record a new generation of expert ``name`` (the previous one goes to its ``history``) in the
    manifest ``data`` and write the expert's ``generation.json``; returns the new record. The caller
    saves the manifest."""
    if lifecycle not in LIFECYCLES:
        raise ValueError(f"lifecycle {lifecycle!r}: choose one of {', '.join(LIFECYCLES)}")
    experts = section(data)["experts"]
    old = experts.get(name)
    record = {
        "generation": (old["generation"] + 1) if old else 1,
        "lifecycle": lifecycle,
        "partition_index": partition_index,
        "active": active,
        "data": provenance if provenance is not None else (old or {}).get("data"),
        "checkpoint": checkpoint,
        "at": round(time.time(), 3),
        "history": [],
    }
    if note:
        record["note"] = note
    if old:
        record["history"] = [*old.get("history", []), {k: v for k, v in old.items() if k != "history"}]
    experts[name] = record
    storage.write_json(
        storage.join(job_output(root, name), GENERATION_FILE),
        {"name": name, "generation": record["generation"], "lifecycle": lifecycle},
    )
    return record


def backfill_trained(data: dict[str, Any], cfg: Any, checkpoint_of: Any) -> None:
    """Give a run without a lineage its first one: each of the K experts ``ddm run`` trained is
    generation 1, ``trained``, with its partition's provenance (``checkpoint_of(name)``: its newest
    checkpoint URL). No-op when the lineage exists."""
    if has_lineage(data):
        return
    for k, name in enumerate(expert_names(cfg)):
        part = storage.join(cfg.root, "partitions", name)
        record_generation(
            data, cfg.root, name, TRAINED, partition_index=k,
            provenance=provenance(part, cfg.data.model_dump(mode="json")), checkpoint=checkpoint_of(name),
        )  # fmt: skip
    router = section(data)["router"]
    if not router:
        router.update(generation=1, output=job_output(cfg.root, "router"), experts=expert_names(cfg))


def record_router(data: dict[str, Any], output: str, experts: list[str], **info: Any) -> dict[str, Any]:
    """The router the run serves now (a new generation)."""
    router = section(data)["router"]
    previous = {k: v for k, v in router.items() if k != "history"}
    history = [*router.get("history", []), previous] if previous else []
    router.clear()
    router.update(
        generation=previous.get("generation", 1) + 1, output=output, experts=list(experts), at=time.time(),
        history=history, **info,
    )  # fmt: skip
    return router


def mark_student_stale(data: dict[str, Any], reason: str, student: str | None) -> None:
    """A student distilled from experts that no longer serve (or whose data must go) is stale until a
    new distillation; ``ddm status`` says so."""
    if student is None:
        return
    st = section(data)["student"]
    st.update(stale=True, reason=reason, checkpoint=student, at=time.time())


def add_event(data: dict[str, Any], op: str, **info: Any) -> None:
    section(data)["events"].append({"at": round(time.time(), 3), "op": op, **copy.deepcopy(info)})


def status_lines(data: dict[str, Any]) -> list[str]:
    """``ddm status``'s generations table (empty for a run without a lineage)."""
    lin = data.get("lineage", {})
    experts = lin.get("experts") or {}
    if not experts:
        return []
    router = lin.get("router") or {}
    serving = set(router.get("experts") or [n for n, r in experts.items() if r.get("active", True)])
    lines = [f"{'expert':<12}{'gen':>4}  {'lifecycle':<10}{'serving':<9}{'images':>7}  data"]
    for name, rec in sorted(experts.items(), key=lambda kv: kv[1]["partition_index"]):
        d = rec.get("data") or {}
        src = d.get("source") or {}
        where = f"{src.get('source', '?')}:{src.get('path', '?')}" if isinstance(src, dict) else str(src)
        shards = d.get("shards") or []
        digest = f" shards {','.join(s['sha256'][:8] for s in shards)}" if shards else ""
        lines.append(
            f"{name:<12}{rec['generation']:>4}  {rec['lifecycle']:<10}{'yes' if name in serving else 'no':<9}"
            f"{d.get('count', '-'):>7}  {where}{digest}"
        )
    if router:
        lines.append(
            f"router generation {router.get('generation')} over {', '.join(router.get('experts', []))}"
        )
    student = lin.get("student") or {}
    if student.get("stale"):
        lines.append(f"student STALE: {student.get('reason')} (re-distil: ddm run ROOT --stages distill)")
    return lines
