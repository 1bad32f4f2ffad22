"""Real faults in training and checkpointing: an expert trainer SIGKILLed mid-run (no handler runs, no
checkpoint on the way out) resumes from its last checkpoint and ends bit-identical to an uninterrupted
run; a checkpoint write SIGKILLed halfway through leaves the previous checkpoint intact and loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_trainer import job_toml, tiny_job

from ddm.core import checkpoint, heartbeat
from ddm.expert.trainer import train
from ddm.train import EXIT_OK, main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _latest_step(directory: Path) -> int:
    try:
        return json.loads((directory / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow  # two trainer processes (interpreter start-up) and the reference run
def test_trainer_sigkilled_mid_run_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    steps = 24
    settings = dict(steps=steps, batch_size=8, checkpoint_every=3, log_every=3, limit=40)
    out = tmp_path / "killed"
    cfg = tmp_path / "job.toml"
    cfg.write_text(job_toml(tiny_job(out, **settings)))
    cmd = [sys.executable, "-m", "ddm.train", "--config", str(cfg), "--no-progress"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while _latest_step(out / "checkpoints") < 6:  # two checkpoints written: kill between later ones
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _latest_step(out / "checkpoints")
    assert 6 <= killed_at < steps, killed_at  # really mid-run
    assert heartbeat.read(str(out))["state"] == "running"  # nothing ran on the way out

    assert main(["--config", str(cfg), "--no-progress"]) == EXIT_OK  # the job rerun (in this process: faster)
    reference = train(tiny_job(tmp_path / "reference", **settings), progress=False)
    assert reference.step == steps
    got = checkpoint.load(str(out / "checkpoints"))
    want = checkpoint.load(str(tmp_path / "reference" / "checkpoints"))
    assert got.step == want.step == steps and got.tensors.keys() == want.tensors.keys()
    for name in want.tensors:  # model, EMA and optimizer state, bit for bit
        assert torch.equal(got.tensors[name], want.tensors[name]), name


WRITER = textwrap.dedent(
    """
    import sys, time
    import torch
    from ddm.core import checkpoint, storage

    class HalfThenHang:  # writes half of what it is given, then tells the parent and waits to be killed
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            print("HALF", flush=True)
            time.sleep(60)
        def __getattr__(self, name):
            return getattr(self.f, name)

    storage.open = lambda path, mode="r": HalfThenHang(open(path, mode))  # only storage's writes
    checkpoint.save(sys.argv[1], 20, {"model.w": torch.full((1000, 100), 20.0)}, {"kind": "expert"})
    """
)


def test_a_checkpoint_write_killed_halfway_leaves_the_previous_one_intact(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    checkpoint.save(str(d), 10, {"model.w": torch.full((1000, 100), 10.0)}, {"kind": "expert"})
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(d)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "HALF", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = [p for p in d.iterdir() if ".tmp-" in p.name]
    assert len(partial) == 1 and partial[0].name.startswith("step-00000020.safetensors")  # killed mid-write
    assert 0 < partial[0].stat().st_size < len(before["step-00000010.safetensors"])
    assert {p.name: p.read_bytes() for p in d.iterdir() if ".tmp-" not in p.name} == before  # untouched
    ck = checkpoint.load(str(d))
    assert ck.step == 10 and torch.equal(ck.tensors["model.w"], torch.full((1000, 100), 10.0))
    checkpoint.save(str(d), 20, {"model.w": torch.full((1000, 100), 20.0)}, {"kind": "expert"})
    assert (
        checkpoint.load(str(d)).step == 20
    )  # the leftover temp file is ignored, not mistaken for a checkpoint
