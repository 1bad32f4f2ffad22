"""``ddm serve run ROOT``: a finished run served on this machine — one expert server process per expert
and the router — sampled through with ``ddm sample --router``; no server outlives the stack."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from ddm.coordinator.config import RunConfig
from ddm.coordinator.manifest import Manifest
from ddm.coordinator.stack import run_experts
from grpc_fixtures import expert_checkpoint, router_checkpoint
from test_grpc_cli import DDM, Proc


def make_run(root: Path, k: int = 2, *, router: bool = True) -> None:
    """A run root as `ddm run` leaves it: a manifest with the config, expert and router checkpoints."""
    cfg = RunConfig.model_validate({"name": "stack", "root": str(root), "partition": {"k": k}})
    Manifest.open(str(root), cfg.model_dump(mode="json"))
    for i in range(k):
        expert_checkpoint(root, i)
    if router:
        router_checkpoint(root, k)


def servers_of(root: Path) -> list[int]:
    """PIDs of live `ddm serve expert` processes serving checkpoints under ``root``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = next(line for line in Path(f"/proc/{entry}/status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if b"expert" in cmd and any(str(root).encode() in part for part in cmd) and "zombie" not in state:
            pids.append(int(entry))
    return pids


def wait_gone(root: Path, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := servers_of(root)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_run_experts_names_what_is_missing(tmp_path: Path) -> None:
    make_run(tmp_path / "ok")
    assert [name for name, _ in run_experts(str(tmp_path / "ok"))] == ["expert-0", "expert-1"]
    make_run(tmp_path / "no-router", router=False)
    with pytest.raises(ValueError, match="router has no checkpoint"):
        run_experts(str(tmp_path / "no-router"))
    with pytest.raises(FileNotFoundError, match="no manifest"):
        run_experts(str(tmp_path / "nothing"))


def test_run_serve_rejects_a_bad_address_before_running(tmp_path: Path) -> None:
    out = subprocess.run([*DDM, "run", "--root", str(tmp_path / "r"), "--serve", "nonsense"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "--serve 'nonsense': expected HOST:PORT" in out.stderr
    assert not (tmp_path / "r").exists()  # nothing ran


@pytest.mark.slow  # three Python processes importing torch: ~15 s on 2 busy cores
def test_serve_run_samples_then_stops_every_process(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_run(root)
    token = tmp_path / "token"
    token.write_text("stack-secret\n")
    stack = Proc([*DDM, "serve", "run", str(root), "--host", "127.0.0.1", "--port", "0", "--token-file", str(token),
                  "--steps", "3"])  # fmt: skip
    try:
        port = stack.wait_for(r"ddm serve run: serving router over 2 experts on 127\.0\.0\.1:(\d+)", timeout=120).group(1)
        assert len(servers_of(root)) == 2
        out = tmp_path / "grid.png"
        sample = subprocess.run(
            [*DDM, "sample", "--router", f"127.0.0.1:{port}", "--n", "4", "--token-file", str(token),
             "--strategy", "full", "--out", str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sample.returncode == 0, sample.stderr
        assert "wrote 4 samples" in sample.stdout and "expert-1" in sample.stdout
        with Image.open(out) as im:
            assert im.format == "PNG"
        code, err = stack.terminate()
        assert code == 0 and "stopping (grace" in err, err
        assert "stack-secret" not in err
        assert wait_gone(root) == []
    finally:
        if stack.p.poll() is None:
            stack.p.kill()


@pytest.mark.slow
def test_a_killed_stack_leaves_no_expert_servers(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_run(root)
    stack = Proc([*DDM, "serve", "run", str(root), "--host", "127.0.0.1", "--port", "0"])
    try:
        stack.wait_for(r"serving router over 2 experts", timeout=120)
        assert len(servers_of(root)) == 2
        stack.p.send_signal(signal.SIGKILL)  # no chance to clean up: the children must go by themselves
        stack.p.wait(timeout=10)
        assert wait_gone(root) == []
    finally:
        if stack.p.poll() is None:
            stack.p.kill()
        for pid in servers_of(root):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_serve_run_reports_a_broken_expert(tmp_path: Path) -> None:
    root = tmp_path / "run"
    make_run(root)
    ckpt_dir = root / "experts" / "expert-1" / "checkpoints"
    for f in ckpt_dir.glob("*.safetensors"):
        f.write_bytes(b"not a checkpoint")
    out = subprocess.run([*DDM, "serve", "run", str(root), "--host", "127.0.0.1", "--port", "0"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 1
    assert "expert server expert-1 exited" in out.stderr, out.stderr
    assert wait_gone(root) == []
