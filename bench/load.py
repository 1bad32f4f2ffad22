"""Load test: many concurrent clients for a fixed time against a router + expert servers on loopback.

    python bench/load.py [--quick] [--clients 64] [--seconds 30]
    python bench/load.py --soak [--seconds 180] [--restart-every 20]

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

``--soak``: the long mode with faults. The stack is ``ddm serve run`` (the router and its supervised
expert processes, experts on fixed ports), and a chaos thread SIGKILLs one expert server every
``--restart-every`` seconds (alternating), waits until the supervisor has restarted it and the router
reports it back (``Info.down_experts`` empty), and records how long that took. Clients set
``allow_degraded``, so a call that lost an expert finishes with the others and is counted as
``degraded`` (declared, like ``shed``); ``errors`` are every other failure. Also reported: the
restarts, each one's ``rejoin_s``, the seconds the router's health was NOT_SERVING, and the RSS of
the router process and of the whole stack after the warm-up and at the end (restarted experts count
with their new processes).

Prints readable lines, then one JSON object as the LAST line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin (bench/serve.py)

import argparse
import json
import math
import random
import re
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from ddm.coordinator.stack import SERVE, ServerProcess, free_ports, start_all
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


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def server(name: str, args: list[str], log: Path) -> ServerProcess:
    """A ``ddm serve ...`` process with one torch thread, its stderr in ``log``."""
    return ServerProcess(
        name, [*SERVE, *args, "--host", "127.0.0.1", "--threads", "1"], env=ONE_THREAD, log=log
    )


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = self.ok = self.shed = self.errors = self.degraded = 0
        self.latencies: list[float] = []
        self.service: list[float] = []  # Result.seconds: time on the router after admission
        self.error_kinds: dict[str, int] = {}

    def add(self, outcome: str, seconds: float, kind: str = "", service: float = 0.0) -> None:
        with self.lock:
            if outcome in ("ok", "degraded"):
                self.ok += 1
                self.degraded += outcome == "degraded"
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
        with RouterClient(address, timeout=args.timeout, token=getattr(args, "token", None)) as client:
            while time.monotonic() < end:
                if tally is not None:
                    with tally.lock:
                        tally.started += 1
                with lock:
                    unanswered[0] += 1
                start = time.perf_counter()
                outcome, kind, service = "ok", "", 0.0
                try:
                    _, info = client.sample(args.n, steps=args.steps, strategy="top-k", top_k=1, seed=i,
                                            allow_degraded=args.soak)  # fmt: skip
                    service = info.seconds
                    outcome = "degraded" if info.degraded_experts else "ok"
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
    p.add_argument(
        "--soak", action="store_true", help="long mode: `ddm serve run`, experts SIGKILLed during the load"
    )
    p.add_argument(
        "--restart-every", type=float, default=20.0, help="soak: seconds between expert kills (default 20)"
    )
    p.add_argument("--keep-log", metavar="FILE", help="soak: copy the ddm serve run log here at the end")
    args = p.parse_args()
    if args.quick and args.soak:
        p.error("--quick and --soak are different modes; choose one")
    args.clients = args.clients or (24 if args.quick else 32 if args.soak else 64)
    args.seconds = args.seconds or (6.0 if args.quick else 180.0 if args.soak else 30.0)
    args.warmup = args.warmup if args.warmup is not None else (2.0 if args.quick else 5.0)
    if args.soak:
        return soak(args)

    servers: list[ServerProcess] = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddm-load-") as tmp:
        root = Path(tmp)
        experts, router_dir = make_run(root)
        try:
            # All three start at once (interpreter start-up dominates on a busy machine): the experts on
            # ports picked here, the router waiting for them (it connects with wait_for_ready).
            ports = free_ports(2)
            servers = [
                server(f"expert-{k}", ["expert", "--checkpoint", ckpt, "--port", str(port),
                                        "--max-queue", str(args.expert_queue)], root / f"expert-{k}.log")
                for k, (ckpt, port) in enumerate(zip(experts, ports))
            ]  # fmt: skip
            servers.append(
                server("router", ["router", "--router-checkpoint", router_dir, "--port", "0",
                                  "--max-concurrent", str(args.max_concurrent), "--max-queue", str(args.max_queue),
                                  "--max-n", "16", "--expert-timeout", "30",
                                  *[x for port in ports for x in ("--expert", f"127.0.0.1:{port}")]],
                       root / "router.log")
            )  # fmt: skip
            address = start_all(servers, 120)[-1]

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
            alive = all(s.alive for s in servers)
        finally:
            for s in reversed(servers):
                s.stop(5)

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


def stack_pids(log: Path) -> dict[str, int]:
    """Each expert's current server pid, from ``ddm serve run``'s log (start-up and restart lines)."""
    pids = {}
    pattern = r"ddm serve run: (expert-\d+) on \S+ \(pid (\d+)\)|expert (expert-\d+) restarted \(pid (\d+)\)"
    for m in re.finditer(pattern, log.read_text()):
        pids[m.group(1) or m.group(3)] = int(m.group(2) or m.group(4))
    return pids


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


class Chaos:
    """SIGKILLs one expert server every ``every`` s (alternating) and times its way back: restarted by
    the supervisor (a new pid in the log) and reported up by the router (``Info.down_experts`` empty)."""

    def __init__(self, address: str, log: Path, names: list[str], every: float):
        self.address, self.log, self.names, self.every = address, log, names, every
        self.stop = threading.Event()
        self.rejoin_s: list[float] = []  # kill -> the router reports it up
        self.restart_s: list[float] = []  # kill -> its new process is ready (the supervisor's log line)
        self.failed_rejoins = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with RouterClient(self.address) as client:
            k = 0
            while not self.stop.wait(self.every):
                name = self.names[k % len(self.names)]
                k += 1
                pid = stack_pids(self.log)[name]
                os.kill(pid, signal.SIGKILL)
                killed, restarted = time.monotonic(), None
                while time.monotonic() - killed < 120:
                    time.sleep(0.1)
                    if restarted is None and stack_pids(self.log)[name] != pid:
                        restarted = round(time.monotonic() - killed, 2)
                    try:
                        back = restarted is not None and not client.info(timeout=2).down_experts
                    except grpc.RpcError:
                        back = False
                    if back:
                        self.restart_s.append(restarted)
                        self.rejoin_s.append(round(time.monotonic() - killed, 2))
                        print(f"  killed {name} (pid {pid}): restarted after {restarted} s, "
                              f"back in the router after {self.rejoin_s[-1]} s", flush=True)  # fmt: skip
                        break
                else:
                    self.failed_rejoins += 1


class HealthWatch:
    """Seconds the router's overall health was not SERVING, polled every 0.1 s."""

    def __init__(self, address: str):
        self.address, self.stop = address, threading.Event()
        self.not_serving_s = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with RouterClient(self.address) as client:
            last = time.monotonic()
            while not self.stop.wait(0.1):
                serving = client.health(timeout=1.0)[0]
                now = time.monotonic()
                if not serving:
                    self.not_serving_s += now - last
                last = now


def soak(args: argparse.Namespace) -> None:
    """``--soak``: ``ddm serve run`` under closed-loop load while its expert servers are killed."""
    from ddm.coordinator.config import RunConfig
    from ddm.coordinator.manifest import Manifest

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddm-soak-") as tmp:
        root = Path(tmp)
        make_run(root)
        cfg = RunConfig.model_validate({"name": "soak", "root": str(root), "partition": {"k": 2}})
        Manifest.open(str(root), cfg.model_dump(mode="json"))
        log = root / "stack.log"
        stack = server("stack", ["run", str(root), "--port", "0", "--expert-ports", ",".join(map(str, free_ports(2))),
                                 "--max-concurrent", str(args.max_concurrent), "--max-queue", str(args.max_queue),
                                 "--max-n", "16"], log)  # fmt: skip
        try:
            address = start_all([stack], 180)[0]
            while len(pids := stack_pids(log)) < 2:
                time.sleep(0.1)
            print(f"ddm serve run up after {time.perf_counter() - began:.1f} s: experts {pids}", flush=True)
            run_load(address, args, args.warmup, None)
            rss_router_warm = stack.rss_mb()
            rss_warm = rss_router_warm + sum(rss_mb(pid) for pid in stack_pids(log).values())
            tally, chaos, health = (
                Tally(),
                Chaos(address, log, sorted(pids), args.restart_every),
                HealthWatch(address),
            )
            chaos.thread.start()
            health.thread.start()
            t0 = time.perf_counter()
            lost = run_load(address, args, args.seconds, tally)
            window = time.perf_counter() - t0
            chaos.stop.set()
            chaos.thread.join(timeout=130)  # lets a restart under way finish
            health.stop.set()
            health.thread.join(timeout=5)
            pids = stack_pids(log)
            rss_router_end = stack.rss_mb()
            rss_end = rss_router_end + sum(rss_mb(pid) for pid in pids.values())
            alive = stack.alive and all(Path(f"/proc/{pid}").exists() for pid in pids.values())
            text = log.read_text()
            exits: dict[str, int] = {}
            for status in re.findall(
                r"expert \S+ \(pid \d+, \S+\) (.+?); restarting it on the same port", text
            ):
                exits[status] = exits.get(status, 0) + 1
            restart_failures = re.findall(r"expert \S+ restart \d+ failed: .*", text)
        finally:
            stack.stop(10)
            if args.keep_log:
                Path(args.keep_log).write_text(log.read_text())
    out = {
        "mode": "soak",
        "requests": tally.started,
        "ok": tally.ok,
        "degraded": tally.degraded,
        "shed": tally.shed,
        "errors": tally.errors,
        "lost": lost,
        "kills": len(chaos.rejoin_s) + chaos.failed_rejoins,
        "restarts": sum(exits.values()),
        "exits": exits,  # what ended each expert process the supervisor restarted (the kills: SIGKILL)
        "restart_failures": restart_failures,
        "failed_rejoins": chaos.failed_rejoins,
        "restart_s": chaos.restart_s,
        "rejoin_s": chaos.rejoin_s,
        "rejoin_max_s": max(chaos.rejoin_s, default=float("nan")),
        "not_serving_s": round(health.not_serving_s, 1),
        "p50_ms": round(percentile(tally.latencies, 0.50) * 1000, 1),
        "p99_ms": round(percentile(tally.latencies, 0.99) * 1000, 1),
        "throughput_rps": round(tally.ok / window, 1),
        "rss_growth_mb": round(rss_end - rss_warm, 1),
        "rss_after_warmup_mb": round(rss_warm, 1),
        "router_rss_growth_mb": round(rss_router_end - rss_router_warm, 1),
        "router_rss_after_warmup_mb": round(rss_router_warm, 1),
        "clients": args.clients,
        "seconds": round(window, 1),
        "restart_every_s": args.restart_every,
        "max_concurrent": args.max_concurrent,
        "max_queue": args.max_queue,
        "error_kinds": tally.error_kinds,
        "servers_alive": alive,
    }
    print(
        f"soak: {args.clients} clients for {window:.1f} s, {out['kills']} expert kills (back after "
        f"{chaos.rejoin_s} s): {tally.ok} ok ({tally.degraded} degraded), {tally.shed} shed, {tally.errors} errors, "
        f"{lost} lost; router NOT_SERVING {out['not_serving_s']} s; RSS {rss_warm:.0f} -> {rss_end:.0f} MB "
        f"(router {rss_router_warm:.0f} -> {rss_router_end:.0f} MB)",
        flush=True,
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
