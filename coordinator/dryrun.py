"""``ddm run --dry-run``: every job the run would submit, rendered, with no cluster and no writes.

Kubernetes islands render the Volcano Job exactly as TorchX would create it (our island scheduler's
dry run: the same code path as a real submission, minus the API call); other islands render the
command line the scheduler would start. The output is one YAML stream: Volcano Jobs are documents,
everything else is a comment, so ``ddm run --dry-run | kubectl apply --dry-run=server -f -`` checks
the kubernetes part against a real cluster.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

import yaml
from ddm.coordinator.islands import IslandsConfig
from ddm.coordinator.kube import make_runner, scheduler_key
from torchx.runner import Runner


@dataclass
class RenderedJob:
    name: str
    island: str
    scheduler: str
    text: str  # YAML of the Volcano Job (kubernetes) or the command line
    resource: dict[str, Any] | None = None  # the Volcano Job as a dict (kubernetes islands)


def render_job(runner: Runner, islands: IslandsConfig, job: Any) -> RenderedJob:
    """Render one launcher JobSpec as its scheduler would submit it."""
    island = islands.island[job.island]
    key = scheduler_key(job.island, island)
    if island.scheduler == "kubernetes":
        info = runner.dryrun(job.app, key, cfg=island.run_cfg())
        resource = info.request.resource
        return RenderedJob(job.name, job.island, key, yaml.safe_dump(resource, sort_keys=False), resource)
    role = job.app.roles[0]
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(role.env.items()))
    cmd = shlex.join([role.entrypoint, *role.args])
    replicas = f" (x{role.num_replicas} nodes)" if role.num_replicas > 1 else ""
    where = f"cd {shlex.quote(role.image)} && " if island.scheduler == "local_cwd" else f"image {role.image}: "
    return RenderedJob(job.name, job.island, key, f"{where}env {env} {cmd}{replicas}")


def distill_jobs(pipeline: Any) -> list:
    """The distill stage's job as ``run_distill_stage`` submits it, except that the router checkpoint it
    names is the router's checkpoints directory (the stage passes the newest file in it, which does
    not exist before the run)."""
    from ddm.coordinator import components
    from ddm.coordinator.distill_stage import distill_job, distill_output
    from ddm.coordinator.pipeline import expert_names, expert_output, router_output
    from ddm.core import storage

    cfg = pipeline.cfg
    dc = cfg.distill
    if cfg.mode == "monolith" or not dc.enabled or cfg.partition.k < 2:
        return []
    router_dir = None if pipeline.router_skipped() else storage.join(router_output(cfg), "checkpoints")
    if dc.teacher.kind == "ensemble" and router_dir is None:
        raise ValueError("distill.teacher.kind = 'ensemble' needs the router; enable router or use 'partition'")
    island = dc.island or pipeline.islands.default
    if island not in pipeline.islands.island:
        raise ValueError(f"distill.island {island!r} is not defined in the islands file")
    dirs = [expert_output(cfg, n) for n in expert_names(cfg)]
    job_cfg = distill_job(cfg, dirs, router_dir)
    return [pipeline._job("distill", job_cfg, distill_output(cfg.root), island, components.trainer, lambda: False)]


def render_run(pipeline: Any) -> list[RenderedJob]:
    """Every TorchX job of the run (experts, router, distill), rendered without touching the run root."""
    if not pipeline.dry_run:
        raise ValueError("render_run needs a Pipeline with dry_run=True (it must not write job configs)")
    jobs = pipeline.expert_jobs() + pipeline.router_jobs() + distill_jobs(pipeline)
    with make_runner(pipeline.islands) as runner:
        return [render_job(runner, pipeline.islands, job) for job in jobs]


def format_stream(jobs: list[RenderedJob]) -> str:
    """One YAML stream: a comment header per job; Volcano Jobs as documents, commands as comments."""
    out: list[str] = []
    for job in jobs:
        out.append("---")
        out.append(f"# job {job.name} on island {job.island} (scheduler {job.scheduler})")
        if job.resource is not None:
            out.append(job.text.rstrip("\n"))
        else:
            out.append(f"# $ {job.text}")
    return "\n".join(out) + "\n"
