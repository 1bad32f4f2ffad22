"""TorchX components: small typed functions that return the AppDef of each ddm job.

A component's docstring is its help. Retries are decided by the coordinator (``launcher``), not the
scheduler, so ``max_retries`` stays 0 here (Volcano mishandles scheduler-side retries).
"""

from __future__ import annotations

import shlex

from torchx import specs

from ddm.coordinator.islands import parse_j


def python_job(
    module: str,
    *args: str,
    name: str,
    image: str,
    python: str = "python",
    j: str = "1x1",
    cpu: int = 1,
    gpu: int = 0,
    memMB: int = 4096,
    env: dict[str, str] | None = None,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Run ``python -m MODULE ARGS`` as one process, or under torchrun when ``j`` asks for more.

    Args:
        module: python module to run (``-m``)
        args: arguments for the module
        name: job name (lowercase, digits, dashes; schedulers derive pod/process names from it)
        image: container image, or the working directory for the local_cwd scheduler
        python: the python executable inside the image (local: the coordinator's own interpreter)
        j: ``NODESxPROCS`` — more than one process runs ``torch.distributed.run`` (DDP, c10d rendezvous)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: extra environment variables
        rdzv_port: rendezvous port on rank 0's host for multi-node jobs
    """
    nodes, procs = parse_j(j)
    env = {"PYTHONUNBUFFERED": "1", **(env or {})}
    if not gpu:
        # One intra-op thread per process unless the caller says otherwise: CPU jobs share cores.
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpu // procs)))
    resource = specs.resource(cpu=cpu, gpu=gpu, memMB=memMB)
    if nodes * procs == 1:
        return specs.AppDef(
            name=name,
            roles=[
                specs.Role(
                    name=name,
                    image=image,
                    entrypoint=python,
                    args=["-m", module, *args],
                    env=env,
                    resource=resource,
                )
            ],
        )
    if nodes == 1:
        rdzv = ["--standalone"]
    else:
        rdzv = [
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"$${{{specs.macros.rank0_env}:=localhost}}:{rdzv_port}",
            "--rdzv-id", specs.macros.app_id,
        ]  # fmt: skip
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        *rdzv,
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(procs),
    ]
    quoted = " ".join(a if a.startswith("$$") or a == specs.macros.app_id else shlex.quote(a) for a in cmd)
    script = f"{quoted} -m {shlex.quote(module)} {' '.join(shlex.quote(a) for a in args)}"
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name=name,
                image=image,
                entrypoint="bash",
                args=["-c", script],
                env=env,
                num_replicas=nodes,
                resource=resource,
                port_map={"c10d": rdzv_port},
            )
        ],
    )


def trainer(config: str, *, name: str, image: str, python: str = "python", j: str = "1x1", cpu: int = 1,
            gpu: int = 0, memMB: int = 4096, env: dict[str, str] | None = None) -> specs.AppDef:  # fmt: skip
    """Train one job - an expert, the router or the student, by the config's ``kind`` - with
    ``python -m ddm.train --config CONFIG`` (resumes by default).

    Args:
        config: URL of the job's config (TOML on the run root)
        name: job name, e.g. ``demo-expert-0``
        image: container image, or the working directory for local_cwd
        python: the python executable inside the image
        j: ``NODESxPROCS``; more than one process trains under torchrun (DDP, or FSDP by train.parallelism)
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: extra environment variables
    """
    return python_job("ddm.train", "--config", config, name=name, image=image, python=python, j=j, cpu=cpu,
                      gpu=gpu, memMB=memMB, env=env)  # fmt: skip
