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
from torchx.runner import Runner

from ddm.coordinator.islands import IslandsConfig
from ddm.coordinator.kube import make_runner, scheduler_key


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
    where = (
        f"cd {shlex.quote(role.image)} && " if island.scheduler == "local_cwd" else f"image {role.image}: "
    )
    return RenderedJob(job.name, job.island, key, f"{where}env {env} {cmd}{replicas}")


def run_jobs(pipeline: Any) -> list:
    """Every TorchX job of the run, as the stages that the config does not skip would submit them."""
    from ddm.coordinator.stages import ALL

    return [job for stage in ALL if not stage.skipped(pipeline.cfg) for job in stage.jobs(pipeline)]


def render_run(pipeline: Any) -> list[RenderedJob]:
    """Every TorchX job of the run (experts, router, distill), rendered without touching the run root."""
    if not pipeline.dry_run:
        raise ValueError("render_run needs a Pipeline with dry_run=True (it must not write job configs)")
    jobs = run_jobs(pipeline)
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
