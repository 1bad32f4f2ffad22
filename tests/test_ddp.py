"""Data-parallel training under a real torchrun (2 processes, gloo on CPU) matches one process.

With the same global batch, each rank computes the gradient of its half's mean loss and DDP averages
the two; that is the full batch's gradient up to float summation order, so the loss sequence and the
weights must agree with a single-process run to a tight tolerance (not bit for bit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ddm.core import checkpoint, heartbeat
from ddm.core.metrics_log import read_rows
from ddm.expert.config import ExpertJobConfig
from ddm.expert.trainer import train

REPO = Path(__file__).resolve().parents[1]


def tiny_job(output: Path, **train_settings: Any) -> ExpertJobConfig:
    settings: dict[str, Any] = dict(
        steps=6,
        batch_size=16,
        warmup_steps=2,
        checkpoint_every=3,
        log_every=1,
        num_threads=1,
        seed=5,
        lr=2e-3,
    )
    settings.update(train_settings)
    return ExpertJobConfig.model_validate(
        dict(name="ddp", output=str(output), data=dict(limit=128), model=dict(arch="DiT-T/4"), train=settings)
    )


def write_toml(job: ExpertJobConfig, path: Path) -> None:
    t = job.train
    path.write_text(
        f'kind = "expert"\nname = "{job.name}"\noutput = "{job.output}"\n'
        f"[data]\nlimit = {job.data.limit}\n"
        f'[model]\narch = "{job.model.arch}"\n'
        f"[train]\nsteps = {t.steps}\nbatch_size = {t.batch_size}\nwarmup_steps = {t.warmup_steps}\n"
        f"checkpoint_every = {t.checkpoint_every}\nlog_every = {t.log_every}\nnum_threads = {t.num_threads}\n"
        f"seed = {t.seed}\nlr = {t.lr}\n"
    )


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_cmd(*args: str) -> list[str]:
    """``torchrun --standalone --nproc-per-node 2 -m ddm.train ARGS`` (a free port is picked)."""
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*cmd, "--standalone", "--nproc-per-node", "2", "-m", "ddm.train", *args]


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    cmd = torchrun_cmd(*args)
    return subprocess.run(
        cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    ddp_job = tiny_job(tmp_path / "ddp")
    write_toml(ddp_job, tmp_path / "job.toml")
    done = torchrun("--config", str(tmp_path / "job.toml"), "--no-progress")
    assert done.returncode == 0, done.stderr[-4000:]

    # One checkpoint set, written once (by rank 0), recording the world size.
    ckpt_dir = tmp_path / "ddp" / "checkpoints"
    names = [
        "step-00000003.json",
        "step-00000003.safetensors",
        "step-00000006.json",
        "step-00000006.safetensors",
    ]
    assert sorted(os.listdir(ckpt_dir)) == ["latest.json", *names]
    ddp_ckpt = checkpoint.load(str(ckpt_dir))
    assert ddp_ckpt.meta["world_size"] == 2 and ddp_ckpt.step == 6
    rows = read_rows(str(tmp_path / "ddp" / "metrics.csv"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one writer: no duplicated rows

    single = train(tiny_job(tmp_path / "single"), progress=False)
    ddp_losses = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
    torch.testing.assert_close(
        ddp_losses, torch.tensor(single.losses, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    assert single.losses[-1] < single.losses[0]  # it trained (lr 2e-3), so a mismatch would show
    single_ckpt = checkpoint.load(str(tmp_path / "single" / "checkpoints"))
    for key, value in single_ckpt.prefixed("model").items():
        torch.testing.assert_close(ddp_ckpt.tensors[f"model.{key}"], value, rtol=1e-4, atol=1e-5)
    for key, value in single_ckpt.prefixed("ema").items():
        torch.testing.assert_close(ddp_ckpt.tensors[f"ema.{key}"], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """Only rank 0 gets SIGTERM; the ranks agree through an all-reduce, so rank 1 does not wait forever in
    the next gradient all-reduce: both stop after the same step and rank 0 writes the checkpoint."""
    out = tmp_path / "out"
    write_toml(tiny_job(out, steps=100_000, checkpoint_every=100_000), tmp_path / "job.toml")
    cmd = torchrun_cmd("--config", str(tmp_path / "job.toml"), "--no-progress")
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.csv").exists() or len(read_rows(str(out / "metrics.csv"))) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start within 180 s"
            time.sleep(0.1)
        rank0 = heartbeat.read(str(out))["pid"]  # rank 0 writes the heartbeat
        os.kill(rank0, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "rerun to resume" in err  # rank 0 stopped cleanly (torchrun itself reports the non-zero exit)
    ckpt = checkpoint.load(str(out / "checkpoints"))
    assert ckpt.meta["world_size"] == 2 and 2 <= ckpt.step < 100_000
    assert heartbeat.read(str(out))["state"] == "stopped"
