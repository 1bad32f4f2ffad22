"""A run's whole serving stack on this machine: one ``ddm serve expert`` process per expert and the
router server over them, on loopback. ``ddm serve run ROOT`` and ``ddm run --serve`` use it.

Experts run as separate processes, as they would on separate hosts: each loads its own checkpoint and
batches its own traffic, and the router reaches them only over gRPC, so what a client sees here is
what it sees on a cluster. Each expert process gets the bearer token through its environment (never
its command line, where ``ps`` would show it) and dies with this process (``PR_SET_PDEATHSIG``), so a
killed stack leaves no orphan servers behind. Every process resolves the same device setting
(``--device``, passed on to each expert server): with ``auto`` on a GPU machine all of them share its GPU.
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ddm.core import checkpoint, storage
from ddm.core.placement import Placement

READY = re.compile(r"ddm serve expert: serving (\S+) on (\S+):(\d+)")


@dataclass
class ExpertProcess:
    name: str
    proc: subprocess.Popen
    address: str = ""
    lines: queue.Queue = field(default_factory=queue.Queue)
    stderr_tail: list[str] = field(default_factory=list)

    def watch(self) -> None:
        """Collect stdout lines (the ready line) and keep the last stderr lines for error messages."""

        def pump_out() -> None:
            for line in self.proc.stdout:
                self.lines.put(line)

        def pump_err() -> None:
            for line in self.proc.stderr:
                self.stderr_tail[:] = [*self.stderr_tail[-19:], line.rstrip()]

        threading.Thread(target=pump_out, daemon=True).start()
        threading.Thread(target=pump_err, daemon=True).start()

    def wait_ready(self, deadline: float) -> str:
        while True:
            if self.proc.poll() is not None and self.lines.empty():
                raise RuntimeError(
                    f"expert server {self.name} exited with code {self.proc.returncode}:\n  "
                    + "\n  ".join(self.stderr_tail[-10:])
                )
            try:
                line = self.lines.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"expert server {self.name} not ready in time") from None
                continue
            if m := READY.search(line):
                self.address = f"{m.group(2)}:{m.group(3)}"
                return self.address


def run_experts(root: str) -> list[tuple[str, str]]:
    """(name, checkpoint directory) of every expert of a finished experts-mode run, in expert order."""
    from ddm.coordinator.config import RunConfig
    from ddm.coordinator.manifest import Manifest
    from ddm.coordinator.pipeline import expert_names, expert_output, router_output

    cfg = RunConfig.model_validate(Manifest.load(root).data["config"])
    if cfg.mode != "experts":
        raise ValueError(f"{root}: a {cfg.mode} run has no router; serve its model with `ddm serve expert`")
    if checkpoint.latest(storage.join(router_output(cfg), "checkpoints")) is None:
        raise ValueError(f"{root}: the router has no checkpoint yet; run `ddm run` to finish the router stage")
    out = []
    for name in expert_names(cfg):
        ckpts = storage.join(expert_output(cfg, name), "checkpoints")
        if checkpoint.latest(ckpts) is None:
            raise ValueError(f"{root}: {name} has no checkpoint yet; run `ddm run` to finish the experts stage")
        out.append((name, ckpts))
    return out


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalStack:
    """Start with ``start()`` (or ``with``); ``address`` is the router's host:port once started."""

    def __init__(
        self,
        root: str,
        *,
        host: str = "127.0.0.1",
        port: int = 50050,
        expert_threads: int = 1,
        token: str | None = None,
        router_options: dict[str, Any] | None = None,
        start_timeout: float = 180.0,
        device: str | Placement = "cpu",
    ):
        if expert_threads < 1:
            raise ValueError(f"expert_threads must be >= 1, got {expert_threads}")
        self.placement = Placement.of(device)  # the router's; the setting itself goes to every expert process
        self.root, self.host, self.port = root, host, port
        self.expert_threads, self.token = expert_threads, token
        self.router_options = router_options or {}
        self.start_timeout = start_timeout
        self.experts: list[ExpertProcess] = []
        self.router: Any = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.router.port}"

    def start(self) -> LocalStack:
        from ddm.router.server import RouterServer

        experts = run_experts(self.root)  # checks the run before anything starts
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("DDM_TOKEN", None)
        if self.token:
            env["DDM_TOKEN"] = self.token
        try:
            for name, ckpts in experts:
                args = [sys.executable, "-m", "ddm.coordinator.cli", "serve", "expert", "--checkpoint", ckpts,
                        "--name", name, "--host", "127.0.0.1", "--port", "0",
                        "--threads", str(self.expert_threads), "--device", self.placement.spec]  # fmt: skip
                proc = subprocess.Popen(
                    args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )  # fmt: skip
                self.experts.append(ExpertProcess(name, proc))
                self.experts[-1].watch()
            deadline = time.monotonic() + self.start_timeout
            addresses = [e.wait_ready(deadline) for e in self.experts]
            self.router = RouterServer(
                storage.join(self.root, "router", "checkpoints"), addresses, address=f"{self.host}:{self.port}",
                token=self.token, expert_token=self.token, device=self.placement, **self.router_options,
            )  # fmt: skip
            self.router.start(wait=False)
            self.router.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop(0)
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        if self.router is not None:
            self.router.stop(grace)
            self.router = None
        for e in self.experts:
            if e.proc.poll() is None:
                e.proc.send_signal(signal.SIGTERM)
        for e in self.experts:
            try:
                e.proc.wait(timeout=grace + 10)
            except subprocess.TimeoutExpired:
                e.proc.kill()
                e.proc.wait()
        self.experts = []

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
