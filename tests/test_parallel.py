"""Every trainer is data-parallel under a real torchrun (2 processes, gloo on the CPU), and FSDP2 shards
an expert: each matches one process to float reduction order, checkpoints are full tensors, and a job
checkpointed at world size 2 resumes at world size 1 (and the other way round).

With the same global batch, each rank computes its half's mean loss and the gradients are averaged (DDP
all-reduce, FSDP reduce-scatter); that is the full batch's gradient up to float summation order, so
losses and weights agree with one process to a tight tolerance, not bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from numerics import write_partitions

from ddm.core import checkpoint
from ddm.core.config import to_toml
from ddm.core.metrics_log import read_rows
from ddm.expert.config import ExpertJobConfig
from ddm.router.config import RouterJobConfig
from ddm.router.distill_config import DistillJobConfig
from ddm.train import JOBS, _load

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = dict(
    batch_size=16, warmup_steps=2, checkpoint_every=3, log_every=1, num_threads=1, lr=2e-3, ema_decay=0.9
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parallel")
    write_partitions(root, 160)
    return root


def expert_job(root: Path, out: Path, **train: Any) -> ExpertJobConfig:
    return ExpertJobConfig.model_validate(dict(
        name="expert", output=str(out), data=dict(source="shards", path=str(root / "partitions" / "expert-0")),
        train={**TRAIN, "steps": 6, "seed": 5, **train},
    ))  # fmt: skip


def router_job(root: Path, out: Path, **train: Any) -> RouterJobConfig:
    return RouterJobConfig.model_validate(dict(
        name="router", output=str(out), data=dict(root=str(root), k=2),
        train={**TRAIN, "steps": 6, "seed": 3, **train}, eval=dict(samples_per_bin=8, bins=2, batch_size=16),
    ))  # fmt: skip


def student_job(root: Path, experts: list[str], out: Path, **train: Any) -> DistillJobConfig:
    return DistillJobConfig.model_validate(dict(
        name="student", output=str(out), experts=experts, data=dict(root=str(root), k=2),
        shortcut=dict(min_step=0.25, fraction=0.25), train={**TRAIN, "steps": 5, "seed": 7, **train},
    ))  # fmt: skip


def torchrun(job: Any, path: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node N -m ddm.train --config PATH`` on the job written as TOML."""
    path.write_text(to_toml(job.model_dump(mode="json")))
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    cmd += [
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "ddm.train",
        "--config",
        str(path),
        "--no-progress",
        *extra,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def in_process(job: Any) -> Any:
    return _load(JOBS[job.kind][1])(job, progress=False).run()


def assert_close_runs(parallel_out: Path, single: Any, single_out: Path, *, world_size: int) -> None:
    rows = read_rows(str(parallel_out / "metrics.csv"))
    assert [r["step"] for r in rows] == list(range(1, len(single.losses) + 1))  # one writer: no duplicates
    losses = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(losses, torch.tensor(single.losses, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert single.losses[-1] != single.losses[0]  # it trained, so a mismatch would show
    par = checkpoint.load(str(parallel_out / "checkpoints"))
    ref = checkpoint.load(str(single_out / "checkpoints"))
    assert par.meta["world_size"] == world_size and par.step == ref.step
    assert par.tensors.keys() == ref.tensors.keys()  # the same full-tensor format for every parallelism
    for key, value in ref.tensors.items():
        assert par.tensors[key].shape == value.shape, key
        torch.testing.assert_close(par.tensors[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.slow
def test_fsdp_expert_matches_one_process_and_announces_its_device(root: Path, tmp_path: Path) -> None:
    done = torchrun(expert_job(root, tmp_path / "fsdp", parallelism="fsdp"), tmp_path / "job.toml")
    assert "2 process(es), fsdp" in done.stderr and "on cpu" in done.stderr
    single = in_process(expert_job(root, tmp_path / "single"))
    assert_close_runs(tmp_path / "fsdp", single, tmp_path / "single", world_size=2)


@pytest.mark.slow
def test_router_trains_data_parallel(root: Path, tmp_path: Path) -> None:
    torchrun(router_job(root, tmp_path / "ddp"), tmp_path / "job.toml")
    single = in_process(router_job(root, tmp_path / "single"))
    assert_close_runs(tmp_path / "ddp", single, tmp_path / "single", world_size=2)
    # Only rank 0 wrote the evaluation, and it matches the one-process router's.
    assert (tmp_path / "ddp" / "accuracy_vs_t.json").exists()


@pytest.mark.slow
def test_student_trains_data_parallel_with_its_teachers(root: Path, tmp_path: Path) -> None:
    experts = []
    for k in range(2):
        job = expert_job(root, tmp_path / f"expert-{k}", steps=2, seed=20 + k)
        in_process(job)
        experts.append(str(Path(job.output) / "checkpoints"))
    torchrun(student_job(root, experts, tmp_path / "ddp"), tmp_path / "job.toml")
    single = in_process(student_job(root, experts, tmp_path / "single"))
    assert_close_runs(tmp_path / "ddp", single, tmp_path / "single", world_size=2)


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_at_another_world_size(root: Path, tmp_path: Path) -> None:
    """Steps 1-3 on 2 FSDP ranks, 4-6 in one process from that checkpoint: the same run as 1-6 at once."""
    out = tmp_path / "resumed"
    torchrun(expert_job(root, out, parallelism="fsdp", steps=3), tmp_path / "job.toml")
    assert checkpoint.load(str(out / "checkpoints")).meta["world_size"] == 2
    rest = in_process(expert_job(root, out, parallelism="fsdp", steps=6))  # one process: fsdp is a no-op
    assert rest.step == 6 and rest.images_seen == 3 * 16
    single = in_process(expert_job(root, tmp_path / "single"))
    ref = checkpoint.load(str(tmp_path / "single" / "checkpoints"))
    got = checkpoint.load(str(out / "checkpoints"))
    torch.testing.assert_close(
        torch.tensor(rest.losses), torch.tensor(single.losses[3:]), rtol=1e-5, atol=1e-6
    )
    for key, value in ref.tensors.items():
        torch.testing.assert_close(got.tensors[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # And back: a one-process checkpoint resumes on 2 FSDP ranks.
    torchrun(expert_job(root, out, parallelism="fsdp", steps=8), tmp_path / "job2.toml")
    assert checkpoint.load(str(out / "checkpoints")).meta["world_size"] == 2
    assert checkpoint.load(str(out / "checkpoints")).step == 8
