"""Chaos harness (issue 17): the tiny pipeline under random faults, compared with a fault-free run.

    python bench/chaos.py [--quick] [--seeds 0,1,2] [--stores local,s3] [--work DIR]

For each seed: one fault-free reference run (``ddm run`` on a local root), then one chaos run per store
(a local root, and ``s3://`` on moto's server on loopback) while a schedule drawn from the seed injects
faults at random moments:

- ``kill_coordinator``: SIGKILL of the ``ddm run`` process only (its TorchX jobs run in their own
  sessions and carry on; the rerun adopts them through their heartbeats, docs/reliability.md);
- ``kill_trainer``: SIGKILL of a running expert, router or student trainer (the coordinator retries it,
  the retry resumes from its last checkpoint);
- ``disk_full`` (local root): the root lives on a small tmpfs mounted in a private mount namespace
  (``unshare --mount``, or ``--user --map-root-user --mount`` when not root); a filler file takes every
  free byte for a while, so every write gets ENOSPC, then is deleted. Where no namespace can be made,
  the kind is reported as not run, with the reason;
- ``s3_drop`` / ``s3_stall`` (s3 root): every process reaches moto through a TCP proxy on 127.0.0.1
  that, for a while, resets every connection (open ones and new ones) or stops forwarding bytes;
- serving (``ddm serve run --expert-ports`` on the finished chaos root, two clients sampling in a
  loop, one with ``allow_degraded``): ``kill_expert_server`` (SIGKILL one expert server process) and
  ``kill_router`` (SIGKILL the ``ddm serve run`` process, which holds the router).

After each fault the harness does what an operator would: when ``ddm run`` exits non-zero (killed, or
it gave up) it runs the same command again once the storage is healthy; after ``kill_router`` it
starts ``ddm serve run`` again on the same ports. ``kill_expert_server`` needs no operator: the stack's
supervisor must restart the expert on its port, the router's health must go NOT_SERVING and back to
SERVING, and the ``allow_degraded`` client must be answered throughout. Checked at the end of each run:
every tensor of the final expert, router and student checkpoints (SHA-256) equals the reference's; the
manifest says every stage done and every job SUCCEEDED with no attempt left open; no temporary or
truncated file is visible under the root (``.tmp-`` names, JSON that does not parse, safetensors whose
header and size disagree); no process of the run is left (found by an environment marker in
/proc/PID/environ; the expert servers of a SIGKILLed stack must be gone within 30 s); every Sample
request was answered, or failed with a documented status (UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED, CANCELLED), every ``allow_degraded`` one while only an expert was down was
answered, and every full (not degraded) answer with the same seed returned the same images.

Prints one line per fault and per run, then one JSON object as the LAST line. The S3 side (moto, the
fault proxy) is ``bench/chaos_proxy.py``; the checks after a run are ``bench/chaos_checks.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import errno
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chaos_checks import (
    MARK,
    alive,
    children,
    errors_seen,
    files,
    kill,
    manifest_problems,
    marked,
    orphans,
    parent,
    partial_files,
    read_proc,
    weights,
)
from chaos_proxy import Moto, Proxy

from ddm.coordinator.stack import free_ports

REPO = Path(__file__).resolve().parents[1]
NS_ENV = "DDM_CHAOS_NAMESPACE"  # set inside the private mount namespace (the tmpfs for disk_full)
TMPFS_MB = 400
DOCUMENTED = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED"}

# configs/tiny.toml, smaller still: every stage runs (distill included, so the student is compared),
# eval is off (it writes metrics, not weights), checkpoints are frequent so kills land between them.
CONFIG = """\
name = "chaos"
root = "runs/chaos"

[data]
limit = {limit}

[partition]
k = 2
fine_k = 16
sample_size = {limit}
niter = 10
encoder = "pixels"
tolerance = 0.1
seed = {seed}

[experts]
poll_seconds = 0.3
lease_seconds = 30

[experts.train]
steps = {expert_steps}
batch_size = {expert_batch}
warmup_steps = 2
checkpoint_every = 2
num_threads = 1
seed = {seed}

[router.model]
arch = "Router-XS/4"

[router.train]
steps = {router_steps}
batch_size = 16
checkpoint_every = 2
seed = {seed}

[router.eval]
samples_per_bin = {samples_per_bin}

[eval]
enabled = false

[distill.shortcut]
min_step = 0.25

[distill.train]
steps = {distill_steps}
batch_size = 8
checkpoint_every = 2
warmup_steps = 2
seed = {seed}

[distill.eval]
enabled = false
"""


def say(msg: str) -> None:
    print(msg, flush=True)


def job_of(cmdline: str) -> str | None:
    """The job a trainer process runs, from the job.toml on its command line."""
    for arg in cmdline.split():
        if arg.endswith("/job.toml"):
            return arg.rsplit("/", 2)[-2]
    return None


# the private tmpfs for a full disk ------------------------------------------------------------------
def enter_namespace(argv: list[str]) -> str | None:
    """Re-exec this harness in a private mount namespace (where it may mount a tmpfs); returns why not
    when that is impossible here (the caller then runs without disk_full)."""
    if os.environ.get(NS_ENV) or not shutil.which("unshare"):
        return None if os.environ.get(NS_ENV) else "no unshare(1) on this machine"
    flags = ["--mount"] if os.geteuid() == 0 else ["--user", "--map-root-user", "--mount"]
    probe = subprocess.run(["unshare", *flags, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    if probe.returncode != 0:
        return (
            f"unshare {' '.join(flags)} + mount -t tmpfs failed: {probe.stderr.strip() or probe.returncode}"
        )
    env = {**os.environ, NS_ENV: "1"}
    os.execvpe("unshare", ["unshare", *flags, "--propagation", "private", sys.executable, *argv], env)
    return None  # not reached


def mount_tmpfs(path: Path, mb: int) -> str | None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if r.returncode == 0 else f"mount -t tmpfs failed: {r.stderr.strip()}"


def fill(path: Path) -> tuple[Path, int]:
    """Take every free byte of the filesystem at ``path``; returns the filler file and its size."""
    filler = path / f"filler-{uuid.uuid4().hex[:6]}"
    chunk = b"\0" * (1 << 20)
    size = 0
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                size += f.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 16]
    return filler, size


# faults ---------------------------------------------------------------------------------------------
@dataclass
class Fault:
    kind: str
    at: float  # seconds into the chaos run (across reruns)
    hold: float = 0.0  # how long a storage fault lasts
    fired_at: float | None = None
    target: str = ""
    effect: str = ""


@dataclass
class Run:
    seed: int
    store: str
    root: str
    faults: list[Fault] = field(default_factory=list)
    coordinator_rcs: list[int] = field(default_factory=list)
    identical: bool = False
    mismatched: list[str] = field(default_factory=list)
    manifest_ok: bool = False
    manifest_problems: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    orphans: dict[int, str] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    sampling_identical: bool | None = None
    seconds: float = 0.0
    job_attempts: dict[str, list[str]] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    errors_seen: dict[str, int] = field(default_factory=dict)
    serve_problems: list[str] = field(default_factory=list)  # the supervisor or health not doing its part


class Chaos(threading.Thread):
    """Fires a run's pipeline faults at their moments, against whatever is running then."""

    def __init__(self, run: Run, rng: random.Random, tag: str, *, proxy: Proxy | None, disk: Path | None):
        super().__init__(daemon=True)
        self.run_, self.rng, self.tag, self.proxy, self.disk = run, rng, tag, proxy, disk
        self.coordinator: subprocess.Popen | None = None
        self.start_time = time.monotonic()
        self.done = threading.Event()
        self.storage_healthy = threading.Event()
        self.storage_healthy.set()
        self.duplicates: set[str] = set()  # jobs seen running in two trainer processes at once
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """The launcher's promise: a job never runs twice at once. Sampled every 0.2 s."""
        while not self.done.wait(0.2):
            seen: dict[str, int] = {}
            for job in self._trainers().values():
                seen[job] = seen.get(job, 0) + 1
            for job, n in seen.items():
                if n > 1 and job not in self.duplicates:
                    self.duplicates.add(job)
                    say(f"  {self.run_.store}: {job} is running in {n} trainer processes at once")

    def elapsed(self) -> float:
        return time.monotonic() - self.start_time

    def run(self) -> None:
        for fault in sorted(self.run_.faults, key=lambda f: f.at):
            while self.elapsed() < fault.at:
                if self.done.wait(0.05):
                    return
            while not self.done.is_set() and not self._fire(fault):
                time.sleep(0.05)  # no target yet (a coordinator between reruns, no trainer running)
            if self.done.is_set():
                return

    def _trainers(self) -> dict[int, str]:
        """pid -> job of every trainer process of the run: the trainer itself, not a torchrun, nor a child
        it is forking (``git rev-parse`` for the checkpoint metadata shows the trainer's command line
        between fork and exec)."""
        found = {
            pid: job_of(cmd)
            for pid, cmd in marked(self.tag).items()
            if job_of(cmd) and " -m ddm." in f" {cmd}"
        }
        return {pid: job for pid, job in found.items() if parent(pid) not in found}

    def _fire(self, fault: Fault) -> bool:
        if fault.kind == "kill_coordinator":
            proc = self.coordinator
            if proc is None or proc.poll() is not None:
                return False
            kill(proc.pid)
            fault.target = f"ddm run pid {proc.pid}"
        elif fault.kind == "kill_coordinator_at_launch":  # the moment a job it launched starts
            proc = self.coordinator
            if proc is None or proc.poll() is not None:
                return False
            known = set(self._trainers())
            deadline = time.monotonic() + 120
            while not (fresh := set(self._trainers()) - known) and time.monotonic() < deadline:
                if self.done.is_set() or proc.poll() is not None:
                    return False
                time.sleep(0.01)
            if not fresh or not kill(proc.pid):
                return False
            fault.target = (
                f"ddm run pid {proc.pid}, just after it launched {self._trainers().get(min(fresh), '?')}"
            )
        elif fault.kind == "kill_trainer":
            trainers = self._trainers()
            if not trainers:
                return False
            pid = self.rng.choice(sorted(trainers))
            if not kill(pid):
                return False
            fault.target = f"{trainers[pid]} trainer pid {pid}"
        elif fault.kind == "disk_full":
            self.storage_healthy.clear()
            filler, size = fill(self.disk)
            fault.target = f"tmpfs full ({size >> 20} MiB filler) for {fault.hold:.1f} s"
            time.sleep(fault.hold)
            filler.unlink()
            self.storage_healthy.set()
        elif fault.kind in ("s3_drop", "s3_stall"):
            self.storage_healthy.clear()
            before = self.proxy.resets
            self.proxy.set_mode(fault.kind.removeprefix("s3_"))
            time.sleep(fault.hold)
            self.proxy.set_mode("pass")
            self.storage_healthy.set()
            extra = f", {self.proxy.resets - before} connections reset" if fault.kind == "s3_drop" else ""
            fault.target = f"proxy {fault.kind.removeprefix('s3_')} for {fault.hold:.1f} s{extra}"
        fault.fired_at = round(self.elapsed() - (fault.hold if fault.kind in STORAGE else 0), 2)
        say(f"  {self.run_.store}: fault {fault.kind} at {fault.fired_at:.1f} s: {fault.target}")
        return True


STORAGE = ("disk_full", "s3_drop", "s3_stall")
SERVE_KINDS = ["kill_expert_server", "kill_router"]


def schedule(
    rng: random.Random, store: str, span: float, n: int, disk_ok: bool, only: list[str] | None = None
) -> list[Fault]:
    """``n`` pipeline faults at random moments in the first ``span`` seconds; every kind of the store once
    before any repeats, in a random order."""
    kinds = ["kill_coordinator", "kill_coordinator_at_launch", "kill_trainer"] + (
        ["s3_drop", "s3_stall"] if store == "s3" else ["disk_full"] if disk_ok else []
    )
    kinds = [k for k in kinds if not only or k in only]
    picks: list[str] = []
    while kinds and len(picks) < n:
        picks += rng.sample(kinds, len(kinds))
    picks = picks[:n]
    moments = sorted(rng.uniform(0.1 * span, 0.9 * span) for _ in picks)
    return [
        Fault(k, round(at, 2), hold=round(rng.uniform(1.0, 4.0), 2) if k in STORAGE else 0.0)
        for k, at in zip(picks, moments)
    ]


# the pipeline ---------------------------------------------------------------------------------------
def child_env(tag: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", MARK: tag, **(extra or {})}
    env.pop("AWS_ENDPOINT_URL_S3", None)  # the coordinator gets the (proxied) endpoint from the config
    env.pop(NS_ENV, None)
    return env


def ddm_run(cfg: Path, root: str, env: dict, log: Path, sets: list[str], chaos: Chaos | None = None,
            max_reruns: int = 12) -> list[int]:  # fmt: skip
    """``ddm run`` until it succeeds, rerun as an operator would after each failure; returns exit codes."""
    rcs = []
    args = [
        sys.executable,
        "-m",
        "ddm",
        "run",
        str(cfg),
        "--root",
        root,
        "--quiet",
        *[a for s in sets for a in ("--set", s)],
    ]
    while True:
        with open(log, "ab") as out:
            out.write(f"\n==== ddm run (attempt {len(rcs) + 1}) ====\n".encode())
            out.flush()
            proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
            if chaos:
                chaos.coordinator = proc
            rc = proc.wait(timeout=900)
        rcs.append(rc)
        if rc == 0:
            return rcs
        if len(rcs) > max_reruns:
            raise RuntimeError(f"ddm run failed {len(rcs)} times; see {log}")
        if chaos:
            say(f"  {chaos.run_.store}: ddm run exited {rc}; rerunning")
            chaos.storage_healthy.wait(60)  # an operator reruns once the disk / store is back
        else:
            raise RuntimeError(f"fault-free ddm run exited {rc}; see {log}")


# serving --------------------------------------------------------------------------------------------
class Serve:
    """``ddm serve run ROOT`` on a fixed port with its experts on fixed ports (``--expert-ports``),
    started, and after a SIGKILL restarted, as an operator would."""

    def __init__(self, root: str, port: int, expert_ports: list[int], env: dict, log: Path):
        self.root, self.port, self.expert_ports, self.env, self.log = root, port, expert_ports, env, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the server writes it until it stops
        ports = ",".join(map(str, self.expert_ports))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ddm", "serve", "run", self.root, "--port", str(self.port), "--steps", "4",
             "--expert-ports", ports],
            cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=out,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:  # the ready line; the rest of stdout is drained in the background
            out.write(line)
            if b"serving router" in line:
                threading.Thread(target=lambda: [out.write(x) for x in self.proc.stdout], daemon=True).start()
                return
            if time.monotonic() > deadline:
                break
        raise RuntimeError(f"ddm serve run did not start (exit {self.proc.poll()}); see {self.log}")

    def experts(self) -> dict[int, tuple[str, int]]:
        """pid -> (name, port) of every live expert server process of the stack."""
        out = {}
        for pid in children(self.proc.pid) if self.proc else []:
            if not alive(pid):  # a killed expert not reaped yet
                continue
            argv = read_proc(f"/proc/{pid}/cmdline").decode(errors="replace").split("\0")
            if "expert" in argv and "--port" in argv and "--name" in argv:
                out[pid] = (argv[argv.index("--name") + 1], int(argv[argv.index("--port") + 1]))
        return out

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def until(what: str, check, timeout: float, every: float = 0.05) -> float:
    """Poll ``check()`` until true; seconds it took. Raises RuntimeError naming ``what`` at ``timeout``."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - t0


def serve_faults(run: Run, rng: random.Random, env: dict, work: Path, kinds: list[str]) -> None:
    """Two clients sample in a loop against ``ddm serve run`` (client 0 with ``allow_degraded``, client 1
    without) while faults hit it:

    - ``kill_expert_server``: SIGKILL of one expert server. Nobody intervenes: the stack's supervisor must
      restart it on the same port, the router's health must go NOT_SERVING and back to SERVING, and
      client 0 must be answered throughout (degraded while the expert is down);
    - ``kill_router``: SIGKILL of ``ddm serve run``. Its expert servers must die with it (no orphan);
      the operator starts it again on the same ports.

    Fills ``run.requests``, ``run.lost`` (client 1: anything but OK or a documented status; client 0
    during an expert's downtime: anything but OK), ``run.orphans``, ``run.faults``."""
    import grpc
    import torch

    from ddm.router.client import RouterClient

    torch.set_num_threads(1)
    port, *expert_ports = free_ports(3)
    serve = Serve(run.root, port, expert_ports, env, work / f"serve-{run.store}.log")
    serve.start()
    stop = threading.Event()
    lock = threading.Lock()
    expert_down = threading.Event()  # set by the harness between an expert's kill and its rejoining
    results: list[tuple[int, str, str | None, bool]] = []  # (client, status, sha if OK, degraded)
    refused: list[str] = []  # client 0 not answered while only an expert was down
    ok_since = [0]  # full (not degraded) OK answers since the last fault

    def client(i: int) -> None:
        with RouterClient(f"127.0.0.1:{port}", timeout=30) as c:
            while not stop.is_set():
                down = expert_down.is_set()
                degraded = False
                try:
                    images, info = c.sample(
                        2, [i, i], seed=17 + i, steps=4, strategy="top-k", top_k=1, timeout=30,
                        allow_degraded=i == 0,
                    )  # fmt: skip
                    status, digest = "OK", f"{i}:" + hashlib.sha256(images.numpy().tobytes()).hexdigest()
                    degraded = bool(info.degraded_experts)
                except grpc.RpcError as e:
                    status, digest = e.code().name, None
                except Exception as e:  # noqa: BLE001  # a stream closed without a result, or anything else: lost
                    status, digest = f"LOST {type(e).__name__}: {e}", None
                with lock:
                    results.append((i, status, digest, degraded))
                    if status == "OK" and not degraded:
                        ok_since[0] += 1
                    if i == 0 and status != "OK" and (down or expert_down.is_set()):
                        refused.append(f"allow_degraded request {status} while an expert was down")
                if status != "OK":
                    time.sleep(0.5)  # a polite client backs off

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    health = RouterClient(f"127.0.0.1:{port}", timeout=5)
    t0 = time.monotonic()

    def serving(service: str = "") -> bool:
        try:
            return health.health(service, timeout=1.0)[0]
        except grpc.RpcError:
            return False

    try:
        for kind in kinds:
            until("the stack answering in full again", lambda: ok_since[0] >= 2, 300)
            time.sleep(rng.uniform(0.0, 1.5))
            fault = Fault(kind, round(time.monotonic() - t0, 2))
            with lock:
                before = len(results)
                ok_since[0] = 0
            if kind == "kill_expert_server":
                experts = serve.experts()
                pid = rng.choice(sorted(experts))
                name, eport = experts[pid]
                expert_down.set()
                kill(pid)
                fault.target = f"expert server {name} pid {pid} (port {eport})"
                say(f"  {run.store}: fault {kind}: {fault.target}; the supervisor must restart it")
                try:
                    down_s = until("router NOT_SERVING after the kill", lambda: not serving(), 30, 0.02)
                except RuntimeError as e:
                    run.serve_problems.append(str(e))
                    down_s = float("nan")
                new: list[int] = []

                def back(name=name, eport=eport, pid=pid, new=new) -> bool:
                    new[:] = [
                        p for p, (n, pt) in serve.experts().items() if n == name and pt == eport and p != pid
                    ]
                    return bool(new) and serving() and serving(f"ddm.v1.Expert/{name}")

                try:
                    up_s = until(f"{name} restarted on port {eport} and the router SERVING", back, 180, 0.1)
                except RuntimeError as e:  # the operator's fix, so that the rest can still be checked
                    run.serve_problems.append(str(e))
                    up_s = float("nan")
                    serve.stop()
                    serve.start()
                expert_down.clear()
                with lock:
                    during = results[before:]
                fault.effect = (
                    f"router NOT_SERVING {down_s:.2f} s after the kill, {name} restarted by the supervisor "
                    f"(pid {new[0] if new else '?'}, same port {eport}), SERVING again {up_s:.1f} s later; while down: "
                    + ", ".join(
                        f"{n} x client {c} {st}"
                        for (c, st), n in sorted(
                            Counter((c, f"{s} degraded" if d else s) for c, s, _, d in during).items()
                        )
                    )
                )
            else:
                experts = serve.experts()
                kill(serve.proc.pid)
                fault.target = f"ddm serve run (router) pid {serve.proc.pid}, experts {sorted(experts)}"
                serve.proc.wait()
                try:
                    until("its expert servers to exit", lambda ex=experts: not any(map(alive, ex)), 30)
                except RuntimeError:
                    for p, (name, eport) in experts.items():
                        if alive(p) and kill(p):
                            run.orphans[p] = f"expert server {name} (port {eport}) of the SIGKILLed stack"
                survivors = [p for p in experts if p in run.orphans]
                say(
                    f"  {run.store}: fault {kind}: {fault.target}; experts outliving it {survivors}; restarting ddm serve run"
                )
                serve.start()
                with lock:
                    fault.effect = f"{len(results) - before} requests ended until the operator's restart; experts outliving it: {survivors}"
            fault.fired_at = fault.at
            run.faults.append(fault)
            say(f"  {run.store}: {kind}: {fault.effect}")
        until("the stack answering in full again", lambda: ok_since[0] >= 2, 300)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        hung = sum(t.is_alive() for t in threads)
        health.close()
        serve.stop()
    for _, status, _, degraded in results:
        key = "LOST" if status.startswith("LOST") else "OK degraded" if degraded else status
        run.requests[key] = run.requests.get(key, 0) + 1
    run.lost = (
        [s for _, s, _, _ in results if s != "OK" and s not in DOCUMENTED] + refused + ["client hung"] * hung
    )
    per_seed: dict[str, set[str]] = {}
    for _, _, digest, degraded in results:
        if digest and not degraded:
            per_seed.setdefault(digest.split(":")[0], set()).add(digest)
    run.sampling_identical = all(len(v) == 1 for v in per_seed.values())


# one seed -------------------------------------------------------------------------------------------
def write_config(work: Path, seed: int, quick: bool = False) -> Path:
    """The run's config. ``quick`` (CI): 6 expert steps of 8 images instead of 8 of 16, 4 router steps
    instead of 6, 2 router-eval samples per bin instead of 5; still three checkpoints of each expert and
    two of the router and the student for a kill to fall between."""
    cfg = work / f"chaos-{seed}.toml"
    sizes = {"limit": 200, "expert_steps": 8, "expert_batch": 16, "router_steps": 6, "distill_steps": 4,
             "samples_per_bin": 5}  # fmt: skip  # ~40 s fault-free on an idle machine
    if quick:
        sizes |= {"expert_steps": 6, "expert_batch": 8, "router_steps": 4, "samples_per_bin": 2}
    cfg.write_text(CONFIG.format(seed=seed, **sizes))
    return cfg


class Reference(threading.Thread):
    """The fault-free run of a seed, side by side with its chaos runs (only their checks wait for it)."""

    def __init__(self, cfg: Path, seed: int, work: Path):
        super().__init__(daemon=True)
        self.cfg, self.seed, self.work = cfg, seed, work
        self.result: tuple[dict[str, str], set[str]] | BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            root, tag, start = (
                str(self.work / f"ref-{self.seed}"),
                f"{self.seed}-ref-{uuid.uuid4().hex[:6]}",
                time.monotonic(),
            )
            ddm_run(self.cfg, root, child_env(tag), self.work / f"ref-{self.seed}.log", [])
            self.result = (weights(root, None), files(root, None))
            left = orphans(tag)
            say(
                f"seed {self.seed} reference: {time.monotonic() - start:.0f} s, {len(self.result[0])} tensors, orphans {list(left.values())}"
            )
        except BaseException as e:  # noqa: BLE001 - raised by get()
            self.result = e

    def get(self) -> tuple[dict[str, str], set[str]]:
        self.join()
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def chaos_run(seed: int, store: str, cfg: Path, reference: Reference, span: float, args, work: Path,
              moto: Moto | None, disk: Path | None, serve_kinds: list[str]) -> Run:  # fmt: skip
    rng = random.Random(f"{seed}-{store}")
    tag = f"{seed}-{store}-{uuid.uuid4().hex[:6]}"
    proxy = None
    sets: list[str] = []
    extra = {"DDM_CACHE": str(work / "cache")}
    if store == "s3":
        import boto3

        bucket = f"chaos-{seed}-{uuid.uuid4().hex[:6]}"
        boto3.client("s3", endpoint_url=moto.endpoint).create_bucket(Bucket=bucket)
        proxy = Proxy(moto.port)
        root = f"s3://{bucket}/run"
        sets.append(f'storage.endpoint_url="{proxy.endpoint}"')
    else:
        root = str(disk / f"run-{seed}") if disk else str(work / f"local-{seed}")
    run = Run(seed, store, root)
    run.faults = schedule(
        rng, store, span, args.faults, disk is not None, args.kinds
    )  # span: of the side-by-side runs
    say(f"seed {seed} {store}: {root}; faults " + ", ".join(f"{f.kind}@{f.at:.1f}s" for f in run.faults))
    env = child_env(tag, extra)
    start = time.monotonic()
    chaos = Chaos(run, rng, tag, proxy=proxy, disk=disk)
    chaos.start()
    try:
        run.coordinator_rcs = ddm_run(cfg, root, env, work / f"run-{seed}-{store}.log", sets, chaos)
    finally:
        chaos.done.set()
        chaos.join(30)
    run.faults = [f for f in run.faults if f.fired_at is not None]  # the run may end before a late one
    run.duplicates = sorted(chaos.duplicates)
    logs = [work / f"run-{seed}-{store}.log", Path(root) / "logs" if store == "local" else work / "cache"]
    run.errors_seen = errors_seen(logs)
    if store == "local" and disk:  # the tmpfs goes with the harness: keep the jobs' logs
        shutil.copytree(Path(root) / "logs", work / f"logs-{seed}-local", dirs_exist_ok=True)
    if store == "s3":
        proxy.set_mode("pass")
    got = weights(root, moto)
    ref, ref_files = reference.get()
    run.mismatched = sorted(k for k in ref.keys() | got.keys() if ref.get(k) != got.get(k))
    run.identical = not run.mismatched
    run.manifest_problems, run.job_attempts = manifest_problems(root, moto)
    run.manifest_ok = not run.manifest_problems
    run.partial = partial_files(root, moto)
    run.missing = sorted(ref_files - files(root, moto))  # e.g. a report the killed job never wrote
    if serve_kinds:
        serve_env = {**env, "AWS_ENDPOINT_URL_S3": moto.endpoint} if store == "s3" else env
        serve_faults(run, rng, serve_env, work, serve_kinds)
    run.orphans = orphans(tag)
    if store == "local" and disk:  # the next seed needs the tmpfs's room (a run takes ~170 MB of 400)
        shutil.rmtree(root, ignore_errors=True)
    run.seconds = round(time.monotonic() - start, 1)
    say(f"  seed {seed} {store}: {run.seconds} s, ddm run exits {run.coordinator_rcs}, attempts {run.job_attempts}, "
        f"errors in logs {run.errors_seen}, jobs run twice at once {run.duplicates}, "
        f"identical {run.identical} ({len(ref)} tensors){'' if run.identical else ' MISMATCH ' + str(run.mismatched[:5])}, "
        f"manifest {'ok' if run.manifest_ok else run.manifest_problems}, partial {run.partial}, missing {run.missing}, orphans {list(run.orphans.values())}, "
        f"requests {run.requests}, lost {run.lost}, serve problems {run.serve_problems}, sampling identical {run.sampling_identical}")  # fmt: skip
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI's short mode: one seed, fewer steps, 3 pipeline faults per store, the local run served under 2 faults",
    )
    p.add_argument("--seeds", help="comma-separated seeds (default 0; 0,1,2 without --quick)")
    p.add_argument("--stores", default="local,s3", help="local, s3 or both (default)")
    p.add_argument("--faults", type=int, help="pipeline faults per run (default 3 with --quick, else 4)")
    p.add_argument(
        "--serve-stores",
        help="stores whose finished run is served under faults (default: local with --quick, else local,s3)",
    )
    p.add_argument(
        "--kinds",
        type=lambda v: v.split(","),
        help="only these pipeline fault kinds (comma-separated; default all)",
    )
    p.add_argument("--span", type=float,
                   help="pipeline faults fall in [0.1, 0.9] x this many seconds of a chaos run (default 80; 60 with --quick)")  # fmt: skip
    p.add_argument("--work", help="working directory (default: a fresh temporary one, removed at the end)")
    p.add_argument(
        "--no-namespace", action="store_true", help="do not enter a mount namespace (no disk_full)"
    )
    args = p.parse_args(argv)
    why_no_disk = (
        "--no-namespace"
        if args.no_namespace
        else enter_namespace([__file__, *(argv if argv is not None else sys.argv[1:])])
    )
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    stores = [s.strip() for s in args.stores.split(",")]
    serve_stores = [
        s for s in (args.serve_stores or ("local" if args.quick else "local,s3")).split(",") if s in stores
    ]
    args.faults = args.faults or (3 if args.quick else 4)
    args.span = args.span or (60.0 if args.quick else 80.0)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ddm-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(name, None)
    disk = None
    if "local" in stores and why_no_disk is None:
        disk = work / "tmpfs"
        why_no_disk = mount_tmpfs(disk, TMPFS_MB)
        if why_no_disk:
            disk = None
    if why_no_disk:
        say(f"disk_full not run: {why_no_disk}")
    moto = Moto(work) if "s3" in stores else None
    t0 = time.monotonic()
    runs: list[Run] = []
    try:
        for seed in seeds:
            cfg = write_config(work, seed, args.quick)
            reference = Reference(cfg, seed, work)  # its time is not measured: faults fall in --span
            span = args.span
            # Serving faults: both kinds, in an order drawn from the seed, on every served store.
            kinds = random.Random(f"{seed}-serve").sample(SERVE_KINDS, 2)
            serve = {s: kinds if s in serve_stores else [] for s in stores}
            # The stores' chaos runs are independent (own root, tag, schedule): run them side by side.
            results: dict[str, Run | BaseException] = {}

            def one(store: str, cfg=cfg, reference=reference, span=span, seed=seed, results=results,
                    serve=serve) -> None:  # fmt: skip
                try:
                    results[store] = chaos_run(
                        seed, store, cfg, reference, span, args, work, moto, disk, serve[store]
                    )
                except BaseException as e:  # noqa: BLE001  # reported below, after the other store finished
                    results[store] = e

            threads = [threading.Thread(target=one, args=(s,)) for s in stores]
            for t in threads:
                t.start()
                time.sleep(1.0)  # do not start two coordinators in the same instant
            for t in threads:
                t.join()
            for store in stores:
                if isinstance(results[store], BaseException):
                    raise results[store]
                runs.append(results[store])
    finally:
        if moto:
            moto.stop()
        if disk:
            subprocess.run(["umount", "-l", str(disk)], check=False)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    kinds: dict[str, int] = {}
    for r in runs:
        for f in r.faults:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
    requests: dict[str, int] = {}
    for r in runs:
        for k, v in r.requests.items():
            requests[k] = requests.get(k, 0) + v
    summary = {
        "seeds": seeds,
        "stores": stores,
        "runs": len(runs),
        "faults_injected": sum(kinds.values()),
        "runs_identical": sum(r.identical for r in runs),
        "manifests_consistent": sum(r.manifest_ok for r in runs),
        "partial_files": sum(len(r.partial) for r in runs),
        "missing_files": sum(len(r.missing) for r in runs),
        "jobs_run_twice": sum(len(r.duplicates) for r in runs),
        "orphans": sum(len(r.orphans) for r in runs),
        "lost_requests": sum(len(r.lost) for r in runs),
        "serve_problems": sum(len(r.serve_problems) for r in runs),
        "requests": requests,
        "sampling_identical": all(r.sampling_identical is not False for r in runs),
        "reruns": sum(len(r.coordinator_rcs) - 1 for r in runs),
        "faults": kinds,
        "disk_full": "run" if disk else f"not run: {why_no_disk}" if "local" in stores else "no local store",
        "wall_s": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(summary), flush=True)
    ok = (summary["runs_identical"] == summary["manifests_consistent"] == len(runs)
          and not (summary["partial_files"] or summary["orphans"] or summary["lost_requests"] or summary["serve_problems"] or summary["jobs_run_twice"] or summary["missing_files"])
          and summary["sampling_identical"])  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
