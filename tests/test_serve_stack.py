"""``ddm serve run ROOT``: a finished run served on this machine — one expert server process per expert
and the router — sampled through with ``ddm sample --router``; no server outlives the stack."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_fixtures import expert_checkpoint, router_checkpoint
from PIL import Image
from test_grpc_cli import DDM, Proc

from ddm.coordinator.config import RunConfig
from ddm.coordinator.manifest import Manifest
from ddm.coordinator.stack import ServerProcess, free_ports, parse_ports, run_experts
from ddm.router.client import RouterClient


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
            state = next(
                line
                for line in Path(f"/proc/{entry}/status").read_text().splitlines()
                if line.startswith("State:")
            )
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
        port = stack.wait_for(
            r"ddm serve run: serving router over 2 experts on 127\.0\.0\.1:(\d+)", timeout=120
        ).group(1)
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


def until(check: Callable[[], object], timeout: float, what: str) -> object:
    end = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)
    return value


def test_expert_ports_are_one_per_expert_or_a_base() -> None:
    assert parse_ports("50061,50070", 2) == [50061, 50070]
    assert parse_ports("50061", 3) == [50061, 50062, 50063]
    for bad, message in [("5006x", "expected comma-separated"), ("1,2,3", "3 ports for 2 experts"),
                         ("7,7", "distinct"), ("0,70000", "distinct and in 1..65535")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_ports(bad, 2)


def test_serve_run_rejects_bad_expert_ports_cleanly(tmp_path: Path) -> None:
    make_run(tmp_path / "run")
    out = subprocess.run([*DDM, "serve", "run", str(tmp_path / "run"), "--expert-ports", "1,2,3"],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert (
        out.stderr.strip()
        == "ddm serve run: --expert-ports '1,2,3': 3 ports for 2 experts; give one per expert or a base port"
    )


@pytest.mark.slow  # three Python processes importing torch, one of them twice: ~30-60 s on 2 busy cores
def test_serve_run_restarts_a_killed_expert_on_its_port_and_health_follows(tmp_path: Path) -> None:
    """Before: after a SIGKILL the expert stayed a zombie, nothing restarted it, the router logged nothing,
    and health stayed SERVING (Info.ready true) while every default request failed with UNAVAILABLE."""
    root = tmp_path / "run"
    make_run(root)
    ports = free_ports(2)
    stack = ServerProcess("stack", [*DDM, "serve", "run", str(root), "--host", "127.0.0.1", "--port", "0",
                                    "--expert-ports", f"{ports[0]},{ports[1]}", "--steps", "2"], keep=100_000)  # fmt: skip

    def log():
        return "\n".join(stack.stderr_tail)

    serving = {"": "SERVING", "ddm.v1.Expert/expert-0": "SERVING", "ddm.v1.Expert/expert-1": "SERVING",
               "ddm.v1.Router": "SERVING", "liveness": "SERVING"}  # fmt: skip
    try:
        address = stack.start().wait_ready(time.monotonic() + 120)
        pid = int(
            until(
                lambda: re.search(rf"expert-1 on 127\.0\.0\.1:{ports[1]} \(pid (\d+)\)", log()), 10, "pids"
            ).group(1)
        )
        with RouterClient(address, timeout=60) as client:
            until(lambda: client.health_list() == serving, 10, "all SERVING")
            os.kill(pid, signal.SIGKILL)
            until(lambda: client.health() == (False, "NOT_SERVING"), 5, "router NOT_SERVING")
            # the expert is down for at least the 0.5 s backoff plus an interpreter's start-up
            assert client.health("ddm.v1.Expert/expert-1") == (False, "NOT_SERVING")
            assert client.health("ddm.v1.Expert/expert-0") == (True, "")
            info = client.info()
            assert not info.ready and list(info.down_experts) == ["expert-1"]
            with pytest.raises(grpc.RpcError) as failed:
                client.sample(2, strategy="full")
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"expert-1 at 127.0.0.1:{ports[1]}" in failed.value.details()
            _, degraded = client.sample(2, strategy="full", allow_degraded=True)
            assert degraded.degraded_experts == ["expert-1"]
            assert (
                f"expert expert-1 (pid {pid}, 127.0.0.1:{ports[1]}) killed by SIGKILL; restarting it on the same port in 0.5 s (restart 1)"
                in log()
            )
            assert (
                f"expert expert-1 at 127.0.0.1:{ports[1]} is down (its server process killed by SIGKILL)"
                in log()
            )
            assert "finished degraded, without expert-1" in log()

            restarted = until(lambda: re.search(rf"expert expert-1 restarted \(pid (\d+)\) on 127\.0\.0\.1:{ports[1]}", log()),
                              90, "restart")  # fmt: skip
            assert int(restarted.group(1)) != pid and not Path(f"/proc/{pid}").exists()  # reaped: no zombie
            until(lambda: client.health_list() == serving, 15, "SERVING again")
            info = client.info()
            assert info.ready and list(info.down_experts) == []
            _, healed = client.sample(2, strategy="full")
            assert healed.degraded_experts == [] and healed.expert_calls["expert-1"] > 0
            assert "expert expert-1 at" in log() and "is back after" in log()
        assert len(servers_of(root)) == 2
        stack.stop(10)
        assert stack.proc.returncode == 0, log()
        assert wait_gone(root) == []
    finally:
        stack.stop(0)
        for pid in servers_of(root):
            os.kill(pid, signal.SIGKILL)


def test_a_child_whose_parent_died_before_its_prctl_ends_itself() -> None:
    """PR_SET_PDEATHSIG only covers a parent that dies after the child set it: a stack SIGKILLed while it
    forks an expert (a restart) would leave that expert running forever. The child checks its parent is
    still the one that forked it; here it is told another pid, as if init had adopted it already."""
    import functools

    from ddm.coordinator import stack

    gone = 1 if os.getpid() != 1 else 2
    child = subprocess.Popen(["sleep", "60"], preexec_fn=functools.partial(stack._die_with_parent, gone))
    try:
        assert child.wait(timeout=10) == 1  # exited before exec
    finally:
        child.kill()
    kept = subprocess.Popen(
        ["sleep", "60"], preexec_fn=functools.partial(stack._die_with_parent, os.getpid())
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            kept.wait(timeout=0.5)  # its parent is alive: it runs
    finally:
        kept.kill()
        kept.wait()
