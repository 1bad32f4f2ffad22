"""Load test: many concurrent clients for a fixed time against a router + expert servers on loopback.

    python bench/load.py [--quick] [--clients 64] [--seconds 30]

Set-up: two tiny random-weight experts (8x8 images: the cost is the serving machinery, not the
model) and a router, each server its own process with one torch thread (so its memory is its own
and measurable: /proc/PID/status VmRSS). The router admits ``--max-concurrent`` Sample calls, queues
``--max-queue`` more and sheds the rest with RESOURCE_EXHAUSTED (router/admission.py); each expert
queues at most ``--expert-queue`` Predicts (expert/batching.py). Many more clients than that sample
in a closed loop (a shed client backs off 50-150 ms, as a polite client would), first for a warm-up, then
for the measured window.

Counted over the window: ``requests`` started, ``ok``, ``shed`` (RESOURCE_EXHAUSTED), ``errors`` (any
other status or exception), ``lost`` (no answer by the end plus a grace period), latency of the ok
calls (``p50_ms``, ``p99_ms``), ``throughput_rps`` (ok calls per second) and ``rss_growth_mb`` (the
servers' summed RSS at the end minus after the warm-up). ``p99_bound_ms`` is what the queue limits
promise. The router runs at most C = ``max_concurrent`` calls and queues at most Q = ``max_queue``,
first come first served; if no admitted call runs longer than S (``service_max_ms``: the largest
Result.seconds, the router's time after admission), the C running calls free their slots within S,
so a call that joins the queue behind at most Q - 1 others is admitted within ceil(Q / C) * S and
done within (ceil(Q / C) + 1) * S, however many clients there are. Without the bound, latency grows
with the number of clients instead (24 clients here, against C + Q = 8 places).
Prints readable lines, then one JSON object as the LAST line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin (bench/serve.py)

import argparse
import json
import math
import queue
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from ddm.core import checkpoint
from ddm.expert.model import DiT, DiTConfig
from ddm.router.client import RouterClient
from ddm.router.model import RouterConfig, RouterNet

IMAGE = {"image_size": 8, "in_channels": 1, "num_classes": 3}


def _save(module: torch.nn.Module, directory: Path, meta: dict, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # random, not adaLN-Zero's zeros
    state = module.state_dict()
    tensors = {
        **{f"model.{k}": v for k, v in state.items()},
        **{f"ema.{k}": v.clone() for k, v in state.items()},
    }
    checkpoint.save(str(directory), 1, tensors, meta)
    return str(directory)


def make_run(root: Path) -> tuple[list[str], str]:
    cfg = DiTConfig(patch_size=4, hidden_size=32, depth=1, num_heads=2, **IMAGE)
    experts = [
        _save(
            DiT(cfg),
            root / f"experts/expert-{k}/checkpoints",
            {"kind": "expert", "name": f"expert-{k}", "arch": "DiT-tiny", "model": cfg.to_dict()},
            k,
        )
        for k in range(2)
    ]
    rcfg = RouterConfig(num_experts=2, patch_size=4, hidden_size=32, depth=1, num_heads=2, **IMAGE)
    router = _save(
        RouterNet(rcfg),
        root / "router/checkpoints",
        {"kind": "router", "name": "router", "model": rcfg.to_dict()},
        9,
    )
    return experts, router


class Server:
    """A server subprocess (one torch thread) that prints ``serving ... on HOST:PORT`` when ready."""

    def __init__(self, command: list[str], log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.log = open(log, "w")  # noqa: SIM115 (open for the server's lifetime, closed in stop())
        self.p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.p.stdout], daemon=True).start()

    def address(self, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.p.poll() is not None:
                    self.log.flush()
                    tail = Path(self.log.name).read_text()[-2000:]
                    raise RuntimeError(f"server exited with {self.p.returncode}:\n{tail}") from None
                continue
            if m := re.search(r"serving .* on (\S+:\d+)", line):
                return m.group(1)
        raise TimeoutError(f"server did not come up; see {self.log.name}")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.p.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for pid {self.p.pid}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


def free_ports(n: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = self.ok = self.shed = self.errors = 0
        self.latencies: list[float] = []
        self.service: list[float] = []  # Result.seconds: time on the router after admission
        self.error_kinds: dict[str, int] = {}

    def add(self, outcome: str, seconds: float, kind: str = "", service: float = 0.0) -> None:
        with self.lock:
            if outcome == "ok":
                self.ok += 1
                self.latencies.append(seconds)
                self.service.append(service)
            elif outcome == "shed":
                self.shed += 1
            else:
                self.errors += 1
                self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_load(address: str, args: argparse.Namespace, seconds: float, tally: Tally | None) -> int:
    """Closed-loop clients for ``seconds``; returns how many calls got no answer (lost)."""
    end = time.monotonic() + seconds
    unanswered = [0]
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        backoff = random.Random(i)
        with RouterClient(address, timeout=args.timeout) as client:
            while time.monotonic() < end:
                if tally is not None:
                    with tally.lock:
                        tally.started += 1
                with lock:
                    unanswered[0] += 1
                start = time.perf_counter()
                outcome, kind, service = "ok", "", 0.0
                try:
                    _, info = client.sample(args.n, steps=args.steps, strategy="top-k", top_k=1, seed=i)
                    service = info.seconds
                except grpc.RpcError as e:
                    outcome = "shed" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "error"
                    kind = e.code().name
                except Exception as e:  # noqa: BLE001 (a benchmark counts every failure)
                    outcome, kind = "error", type(e).__name__
                with lock:
                    unanswered[0] -= 1
                if tally is not None:
                    tally.add(outcome, time.perf_counter() - start, kind, service)
                if outcome == "shed":
                    time.sleep(backoff.uniform(0.05, 0.15))  # a polite client backs off, with jitter

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()) + args.timeout + 5)
    return unanswered[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run for CI (~25 s with start-up)")
    p.add_argument("--clients", type=int, help="concurrent client threads (default 64; quick 24)")
    p.add_argument("--seconds", type=float, help="measured window, s (default 30; quick 6)")
    p.add_argument("--warmup", type=float, help="warm-up before measuring, s (default 5; quick 2)")
    p.add_argument("--max-concurrent", type=int, default=4, help="router: Sample calls at once (default 4)")
    p.add_argument("--max-queue", type=int, default=2, help="router: Sample calls waiting (default 2)")
    p.add_argument("--expert-queue", type=int, default=16, help="expert: Predicts pending (default 16)")
    p.add_argument("--n", type=int, default=2, help="images per request (default 2)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps per request (default 4)")
    p.add_argument("--timeout", type=float, default=30.0, help="client deadline per call, s (default 30)")
    args = p.parse_args()
    args.clients = args.clients or (24 if args.quick else 64)
    args.seconds = args.seconds or (6.0 if args.quick else 30.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 5.0)

    servers: list[Server] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddm-load-") as tmp:
        root = Path(tmp)
        experts, router_dir = make_run(root)
        try:
            # All three start at once (interpreter start-up dominates on a busy machine): the experts on
            # ports picked here, the router waiting for them (it connects with wait_for_ready).
            ports = free_ports(2)
            serve = [sys.executable, "-m", "ddm.coordinator.cli", "serve"]
            local = ["--host", "127.0.0.1", "--threads", "1"]
            for k, (ckpt, port) in enumerate(zip(experts, ports)):
                servers.append(
                    Server(
                        [*serve, "expert", "--checkpoint", ckpt, *local, "--port", str(port),
                         "--max-queue", str(args.expert_queue)],
                        root / f"expert-{k}.log",
                    )
                )  # fmt: skip
            router = Server(
                [*serve, "router", "--router-checkpoint", router_dir, *local, "--port", "0",
                 "--max-concurrent", str(args.max_concurrent), "--max-queue", str(args.max_queue),
                 "--max-n", "16", "--expert-timeout", "30",
                 *[x for port in ports for x in ("--expert", f"127.0.0.1:{port}")]],
                root / "router.log",
            )  # fmt: skip
            servers.append(router)
            for s in servers[:-1]:
                s.address()
            address = router.address()

            with RouterClient(address) as client:
                solo = []
                for i in range(7):
                    start = time.perf_counter()
                    client.sample(args.n, steps=args.steps, strategy="top-k", top_k=1, seed=i)
                    solo.append(time.perf_counter() - start)
            solo_ms = statistics.median(solo[2:]) * 1000
            print(f"servers up after {time.perf_counter() - began:.1f} s", flush=True)
            print(f"solo request: {solo_ms:.1f} ms ({args.n} images, {args.steps} steps)", flush=True)

            run_load(address, args, args.warmup, None)
            rss_warm = sum(s.rss_mb() for s in servers)
            tally = Tally()
            t0 = time.perf_counter()
            lost = run_load(address, args, args.seconds, tally)
            window = time.perf_counter() - t0
            rss_end = sum(s.rss_mb() for s in servers)
            alive = all(s.p.poll() is None for s in servers)
        finally:
            for s in reversed(servers):
                s.stop()

    service_max_ms = max(tally.service, default=float("nan")) * 1000
    bound = (math.ceil(args.max_queue / args.max_concurrent) + 1) * service_max_ms
    out = {
        "requests": tally.started,
        "ok": tally.ok,
        "shed": tally.shed,
        "errors": tally.errors,
        "lost": lost,
        "p50_ms": round(percentile(tally.latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(tally.latencies, 0.99) * 1000, 1),
        "throughput_rps": round(tally.ok / window, 1),
        "rss_growth_mb": round(rss_end - rss_warm, 1),
        "rss_after_warmup_mb": round(rss_warm, 1),
        "solo_ms": round(solo_ms, 1),
        "service_max_ms": round(service_max_ms, 1),
        "p99_bound_ms": round(bound, 1),
        "clients": args.clients,
        "seconds": round(window, 1),
        "max_concurrent": args.max_concurrent,
        "max_queue": args.max_queue,
        "expert_queue": args.expert_queue,
        "error_kinds": tally.error_kinds,
        "servers_alive": alive,
    }
    print(
        f"{args.clients} clients for {window:.1f} s: {tally.ok} ok, {tally.shed} shed, {tally.errors} errors, "
        f"{lost} lost; p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms (bound {out['p99_bound_ms']} ms); "
        f"{out['throughput_rps']} req/s; server RSS {rss_warm:.0f} -> {rss_end:.0f} MB",
        flush=True,
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
