"""A run's whole serving stack on this machine: one ``ddm serve expert`` process per expert and the
router server over them, on loopback. ``ddm serve run ROOT`` and ``ddm run --serve`` use it, and so do
the benchmarks and tests, through :class:`ServerProcess` (start a ``ddm serve`` process, wait for its
ready line) and :func:`start_all` (start several at once, wait until every one is ready).

Experts run as separate processes, as they would on separate hosts: each loads its own checkpoint and
batches its own traffic, and the router reaches them only over gRPC, so what a client sees here is
what it sees on a cluster. Each expert process gets the bearer token through its environment (never
its command line, where ``ps`` would show it) and dies with this process (``PR_SET_PDEATHSIG``), so a
killed stack leaves no orphan servers behind. Every process resolves the same device setting
(``--device``, passed on to each expert server): with ``auto`` on a GPU machine all of them share its GPU.

The stack supervises its experts. An expert process that exits (crash, OOM kill, SIGKILL) is reaped
and logged with its exit status, the router is told at once (its health turns NOT_SERVING, with the
expert's own health service ``ddm.v1.Expert/NAME``; ``router.server``), and the process is started
again on the same port after a backoff (0.5 s doubling to 30 s; back to 0.5 s once a restart stayed up
for a minute). The port is the one given (``expert_ports``) or else the one the first start picked,
so the router's channel reconnects to the new process by itself and the expert rejoins.

The stack replaces an expert without downtime (``ReplaceExpert`` with a checkpoint, ``ddm serve replace``;
``router.replace``): :meth:`LocalStack.launch` starts a new expert server process for the new
checkpoint on a free port and waits until it is ready; the router switches to it between sampler
steps and waits for the old one to drain; then the old process is stopped (SIGTERM, graceful) and the
new one is supervised in its place (its restarts reuse its own port).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ddm.core import checkpoint, storage
from ddm.core.placement import Placement

log = logging.getLogger(__name__)
READY = re.compile(r"ddm serve (\w+): serving (.+) on (\S+):(\d+)\s*$")
SERVE = [sys.executable, "-m", "ddm.coordinator.cli", "serve"]
RESTART_BACKOFF = (0.5, 30.0)  # first wait, cap (doubling between)
STABLE_AFTER = 60.0  # a restart that stayed up this long resets the backoff


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None  # loaded here, not after fork
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: SIGTERM when the parent goes. A parent that died before
    the prctl (SIGKILLed while forking) sends nothing, so a child that finds another parent than
    ``parent`` (init or a subreaper adopted it) exits at once instead of running on as an orphan."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)  # before exec: no server ever starts


def exit_status(code: int | None) -> str:
    """``exited with code 1`` / ``killed by SIGKILL`` for a Popen return code."""
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class ServerProcess:
    """One ``ddm serve KIND ...`` subprocess, ready once it prints ``ddm serve KIND: serving ... on
    HOST:PORT``. stdout is read for that line; stderr goes to ``log`` (a file) if given, else its last
    ``keep`` lines are kept (``stderr_tail``: error messages, tests) and, with ``echo``, copied to this
    process's stderr prefixed with ``name``. ``start()`` may be called again after the process ended
    (a restart)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log: str | Path | None = None,
        echo: bool = False,
        what: str = "server",
        keep: int = 20,
    ):
        self.name, self.argv, self.what = name, list(argv), what
        self.env = env
        self.log_path = Path(log) if log is not None else None
        self.echo, self.keep = echo, keep
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.started_at = 0.0
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr_tail: list[str] = []
        self._log: TextIO | None = None
        self._pumps: list[threading.Thread] = []

    def start(self) -> ServerProcess:
        self.lines = queue.Queue()
        self.stderr_tail = []
        if self.log_path is not None and self._log is None:
            self._log = open(self.log_path, "a")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=self._log or subprocess.PIPE, text=True, env=self.env,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()) if _LIBC is not None else None,
        )  # fmt: skip
        self.started_at = time.monotonic()
        proc, lines = self.proc, self.lines
        self._pumps = [threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)]
        if self._log is None:
            self._pumps.append(threading.Thread(target=self._pump_err, args=(proc,), daemon=True))
        for t in self._pumps:
            t.start()
        return self

    def _pump_err(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.stderr_tail.append(line.rstrip())
            del self.stderr_tail[: -self.keep]
            if self.echo:
                sys.stderr.write(f"[{self.name}] {line}")
                sys.stderr.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 10) -> str:
        if self.log_path is not None:
            if self._log is not None:
                self._log.flush()
            return "\n  ".join(self.log_path.read_text().splitlines()[-n:])
        return "\n  ".join(self.stderr_tail[-n:])

    def wait_ready(self, deadline: float) -> str:
        """Wait for the ready line until ``deadline`` (time.monotonic()); return HOST:PORT."""
        while True:
            if self.proc.poll() is not None and self.lines.empty():
                time.sleep(0.1)  # let the stderr pump catch the last lines
                raise RuntimeError(
                    f"{self.what} {self.name} {exit_status(self.proc.returncode)}:\n  {self.tail()}"
                )
            try:
                line = self.lines.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.what} {self.name} not ready in time") from None
                continue
            if m := READY.search(line):
                self.address = f"{m.group(3)}:{m.group(4)}"
                return self.address

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit and for its output to be read to the end; its return code."""
        code = self.proc.wait(timeout)
        for t in self._pumps:
            t.join(timeout=5)
        return code

    def rss_mb(self) -> float:
        """Resident memory of the process, MB (/proc/PID/status VmRSS)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def signal(self, sig: int) -> None:
        if self.alive:
            self.proc.send_signal(sig)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited ``grace + 10`` s later."""
        if self.proc is not None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def start_all(servers: Sequence[ServerProcess], timeout: float) -> list[str]:
    """Start every server at once (interpreter start-up dominates on a busy machine) and wait until all
    are ready; their addresses, in order. On any failure every one is stopped and the error raised."""
    try:
        for s in servers:
            if not s.alive:
                s.start()
        deadline = time.monotonic() + timeout
        return [s.wait_ready(deadline) for s in servers]
    except BaseException:
        for s in servers:
            s.stop(0)
        raise


def run_experts(root: str) -> list[tuple[str, str]]:
    """(name, checkpoint directory) of every expert a finished experts-mode run serves now, in the
    router's output order: its K trained experts, or what its lineage says after ``ddm add-expert`` /
    ``ddm retire-expert`` (``ddm.coordinator.lineage``)."""
    from ddm.coordinator.config import RunConfig
    from ddm.coordinator.lineage import router_dir, serving_experts
    from ddm.coordinator.manifest import Manifest
    from ddm.coordinator.pipeline import expert_output

    data = Manifest.load(root).data
    cfg = RunConfig.model_validate(data["config"])
    if cfg.mode != "experts":
        raise ValueError(f"{root}: a {cfg.mode} run has no router; serve its model with `ddm serve expert`")
    if checkpoint.latest(storage.join(router_dir(root, data), "checkpoints")) is None:
        raise ValueError(
            f"{root}: the router has no checkpoint yet; run `ddm run` to finish the router stage"
        )
    out = []
    for name in serving_experts(cfg, data):
        ckpts = storage.join(expert_output(cfg, name), "checkpoints")
        if checkpoint.latest(ckpts) is None:
            raise ValueError(
                f"{root}: {name} has no checkpoint yet; run `ddm run` to finish the experts stage"
            )
        out.append((name, ckpts))
    return out


def run_router(root: str) -> str:
    """The router checkpoints folder a run serves now: its lineage's router, else ``ROOT/router`` (also
    for a root without a manifest, e.g. checkpoints copied to a serving machine)."""
    from ddm.coordinator.lineage import router_dir
    from ddm.coordinator.manifest import MANIFEST, Manifest

    data = Manifest.load(root).data if storage.exists(storage.join(root, MANIFEST)) else {}
    return storage.join(router_dir(root, data), "checkpoints")


def parse_ports(spec: str, count: int) -> list[int]:
    """``--expert-ports``: ``P1,P2,...`` (one per expert, in expert order) or one port ``P`` meaning
    P, P+1, ..., P+count-1. Raises ValueError naming the option."""
    try:
        values = [int(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"--expert-ports {spec!r}: expected comma-separated port numbers or one base port"
        ) from None
    if len(values) == 1 and count > 1:
        values = [values[0] + k for k in range(count)]
    if len(values) != count:
        raise ValueError(
            f"--expert-ports {spec!r}: {len(values)} ports for {count} experts; give one per expert or a base port"
        )
    if any(not 1 <= v <= 65535 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"--expert-ports {spec!r}: ports must be distinct and in 1..65535, got {values}")
    return values


class ExpertProcess(ServerProcess):
    """A supervised ``ddm serve expert`` of the stack; ``port`` is fixed once known (restarts reuse it)."""

    def __init__(self, name: str, ckpts: str, port: int, args: Sequence[str], env: dict[str, str]):
        self.ckpts, self.port, self.extra = ckpts, port, list(args)
        self.restarts = 0
        self.retired = False  # replaced: its exit is expected, the supervisor lets it go
        super().__init__(name, [], env=env, echo=True, what="expert server")
        self._set_argv()

    def _set_argv(self) -> None:
        self.argv = [*SERVE, "expert", "--checkpoint", self.ckpts, "--name", self.name, "--host", "127.0.0.1",
                     "--port", str(self.port), *self.extra]  # fmt: skip

    def wait_ready(self, deadline: float) -> str:
        address = super().wait_ready(deadline)
        if self.port == 0:  # recorded: a restart listens where the router already dials
            self.port = int(address.rsplit(":", 1)[1])
            self._set_argv()
        return address


class LocalStack:
    """Start with ``start()`` (or ``with``); ``address`` is the router's host:port once started.

    ``expert_ports``: one port per expert (default: each picks a free one, kept for its restarts).
    ``supervise``: restart an expert process that exits (default True)."""

    def __init__(
        self,
        root: str,
        *,
        host: str = "127.0.0.1",
        port: int = 50050,
        expert_threads: int = 1,
        expert_ports: Sequence[int] | str | None = None,
        expert_args: Sequence[str] = (),
        token: str | None = None,
        router_options: dict[str, Any] | None = None,
        start_timeout: float = 180.0,
        device: str | Placement = "cpu",
        supervise: bool = True,
        restart_backoff: tuple[float, float] = RESTART_BACKOFF,
    ):
        if expert_threads < 1:
            raise ValueError(f"expert_threads must be >= 1, got {expert_threads}")
        self.placement = Placement.of(device)  # the router's; the setting itself goes to every expert process
        self.root, self.host, self.port = root, host, port
        self.expert_threads, self.token = expert_threads, token
        self.expert_ports = expert_ports
        self.expert_args = list(expert_args)
        self.router_options = router_options or {}
        self.start_timeout = start_timeout
        self.supervise, self.restart_backoff = supervise, restart_backoff
        self.experts: list[ExpertProcess] = []
        self.router: Any = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and stop() never cross: no process starts after stop
        self._supervisors: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.router.port}"

    def start(self) -> LocalStack:
        from ddm.router.server import RouterServer

        experts = run_experts(self.root)  # checks the run before anything starts
        ports = self.expert_ports or [0] * len(experts)
        if isinstance(ports, str):
            ports = parse_ports(ports, len(experts))
        if len(ports) != len(experts):
            raise ValueError(f"expert_ports: {len(ports)} ports for {len(experts)} experts")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("DDM_TOKEN", None)
        if self.token:
            env["DDM_TOKEN"] = self.token
        args = ["--threads", str(self.expert_threads), "--device", self.placement.spec, *self.expert_args]
        # --expert-index: the expert's position among the router's outputs (after a retirement, not the
        # number in its name), which the router checks its expert list against.
        self.experts = [ExpertProcess(name, ckpts, p, ["--expert-index", str(k), *args], env)
                        for k, ((name, ckpts), p) in enumerate(zip(experts, ports))]  # fmt: skip
        try:
            addresses = start_all(self.experts, self.start_timeout)
            self.router = RouterServer(
                run_router(self.root), addresses, address=f"{self.host}:{self.port}",
                token=self.token, expert_token=self.token, device=self.placement, **self.router_options,
            )  # fmt: skip
            self.router.start(wait=False)
            self.router.wait_ready(self.start_timeout)
        except BaseException:
            self.stop(0)
            raise
        if self.supervise:
            for e in self.experts:
                self._start_supervisor(e)
        self.router.launcher = self
        return self

    def _start_supervisor(self, e: ExpertProcess) -> None:
        t = threading.Thread(target=self._supervise, args=(e,), name=f"supervise-{e.name}", daemon=True)
        t.start()
        self._supervisors.append(t)

    # -- replacement (router.replace.Launcher) ----------------------------------------------------------

    def launch(self, name: str, checkpoint: str, timeout: float) -> _Launched:
        """A new expert server process for ``checkpoint`` as expert ``name``, ready, on a free port."""
        names = [e.name for e in self.experts]
        if name not in names:
            raise ValueError(f"expert: no expert {name!r} in this stack; it serves {', '.join(names)}")
        old = self.experts[names.index(name)]
        new = ExpertProcess(name, checkpoint, 0, old.extra, old.env)
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError("the stack is stopping")
            new.start()
        try:
            new.wait_ready(time.monotonic() + timeout)
        except BaseException:
            new.stop(0)
            raise
        log.warning(
            "expert %s: replacement server for %s ready on %s (pid %d)",
            name,
            checkpoint,
            new.address,
            new.pid,
        )
        return _Launched(self, old, new)

    def _commit(self, old: ExpertProcess, new: ExpertProcess) -> None:
        """The router uses ``new`` now: supervise it in ``old``'s place and stop ``old``."""
        with self._lock:
            old.retired = True
            if old in self.experts:
                self.experts[self.experts.index(old)] = new
            stopping = self._stopping.is_set()
        if self.supervise and not stopping:
            self._start_supervisor(new)
        old.stop(5.0)
        log.warning(
            "expert %s: old server (pid %d) stopped; pid %d serves it on %s",
            new.name,
            old.pid,
            new.pid,
            new.address,
        )

    # -- supervision -------------------------------------------------------------------------------------

    def _remote(self, name: str):
        return next((r for r in (self.router.experts if self.router else []) if r.name == name), None)

    def _supervise(self, e: ExpertProcess) -> None:
        """Wait for ``e`` to exit; unless the stack is stopping, restart it on its port with backoff."""
        first, cap = self.restart_backoff
        backoff = first
        while not self._stopping.is_set():
            code = e.proc.wait()  # reaps it: no zombie
            if self._stopping.is_set() or e.retired:
                return
            if time.monotonic() - e.started_at >= STABLE_AFTER:
                backoff = first
            status = exit_status(code)
            log.warning(
                "expert %s (pid %d, 127.0.0.1:%d) %s; restarting it on the same port in %.1f s (restart %d)%s",
                e.name, e.pid, e.port, status, backoff, e.restarts + 1,
                "\n  " + e.tail(5) if e.tail(5) and code and code > 0 else "",
            )  # fmt: skip
            remote = self._remote(e.name)
            if remote is not None:  # the router need not wait for its next health check to know
                remote.liveness.failed(f"its server process {status}")
            if self._stopping.wait(backoff):
                return
            backoff = min(cap, backoff * 2)
            e.restarts += 1
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    e.start()
                e.wait_ready(time.monotonic() + self.start_timeout)
            except (RuntimeError, TimeoutError, OSError) as err:
                if self._stopping.is_set():
                    return
                log.warning("expert %s restart %d failed: %s", e.name, e.restarts, err)
                if e.alive:
                    e.proc.kill()
                continue
            log.warning(
                "expert %s restarted (pid %d) on %s; the router rejoins it at its next health check",
                e.name, e.pid, e.address,
            )  # fmt: skip
            remote = self._remote(e.name)
            if remote is not None:
                remote.reconnect()

    def stop(self, grace: float = 5.0) -> None:
        with self._lock:
            self._stopping.set()
        if self.router is not None:
            self.router.stop(grace)
            self.router = None
        for e in self.experts:
            e.signal(signal.SIGTERM)
        for e in self.experts:
            e.stop(grace)
        for t in self._supervisors:
            t.join(timeout=5)
        self.experts, self._supervisors = [], []

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Launched:
    """A replacement server of the stack (router.replace.Launched)."""

    def __init__(self, stack: LocalStack, old: ExpertProcess, new: ExpertProcess):
        self.stack, self.old, self.new = stack, old, new
        self.address = new.address

    def commit(self) -> None:
        self.stack._commit(self.old, self.new)

    def abort(self) -> None:
        self.new.stop(0)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free on ``host`` right now (held open together so they differ), e.g. for
    ``--expert-ports``. Another process may still take one before it is bound: a choice, not a lease."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
