"""Serving benchmark: the ensemble through the router and expert servers over gRPC, against the same
ensemble in one process, on the same machine, in one run.

    python bench/serve.py [--quick] [--experts 4] [--steps 8]

Set-up: K tiny DiT-T/4 experts on 28x28 (random weights: timing does not depend on training) and a
router briefly trained to spread samples over the experts, saved as checkpoints in a temporary run
root. Each expert server runs in its own process
(`ddm serve expert`, so the GIL never serialises two experts) and the router server in another
(`ddm serve router`); this process runs the clients and, in between, the in-process baseline
(local experts + router in an Ensemble).

Threads (the machine has 2 cores, shared with other work): every server process gets ONE torch
thread: up to K expert processes then compute at once and the OS spreads them over the 2 cores, while
K processes x 2 threads would oversubscribe the cores K-fold. The in-process baseline gets its best
set-up, chosen by measurement: 1 thread, 2 threads, or 1 thread with the experts called in parallel
threads (the in-process analogue of separate servers). OMP_WAIT_POLICY=PASSIVE everywhere: an idle
OpenMP thread sleeps instead of spinning on a core another process needs (without it a 2-thread
forward on this machine slows down 10-40x whenever the other core is busy). Measurements alternate
between the two sides (A, B, A, B, ...) so background load hits both alike; figures are medians of
per-pair ratios. The router is ~18% of an expert's parameters, as in the paper (width 72, depth 2).

Wall time alone is biased on a shared machine: five busy server processes win a larger share of the
cores from other people's jobs than one in-process run does (CFS shares by thread). So the serving
vs in-process figures are measured in wall time AND in CPU seconds (all our processes), and the
headline is the less favourable one for serving; both are in the JSON (``*_wall``, ``*_cpu``).

Measured (CFG scale 3: each selected expert evaluates 2 rows per sample per step; Euler):
  * grpc_overhead_bN: time per sample through the router (one client, one request of N images, top-1)
    / the in-process ensemble's time per sample at the same N. Headline: max(wall, CPU) ratio.
  * concurrent_throughput_ratio: 32 client threads each sampling small requests through the router at
    once (cohorts, router batching, coalesced Predicts, expert batching) / the best in-process batched
    throughput (best batch size), images per second (wall) or per CPU second. Headline: the minimum.
  * top1_cost_ratio: top-1 time per sample / full ensemble's, both through the router at batch 64 with
    the same guidance_mode and route_every (the served defaults; --guidance-mode, --route-every), so the
    full side routes as rarely as top-1 (wall: both sides are the same processes, so no share bias; the
    CPU ratio is reported too, and the in-process ratio as ``top1_cost_ratio_in_process``). Ideal: 1/K
    plus the router's share. ``top1_cost_ratio_by_setting``: the same for each guidance mode and
    route_every 1, 2, 4 (1 and 4 with --quick). --only-top1-cost measures only these.
Prints readable lines, then one JSON object as the LAST line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (ddm/__init__.py does too)

import argparse  # noqa: E402 (below: OpenMP's env var must be set before torch is imported)
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ddm.coordinator.stack import SERVE, ServerProcess, start_all
from ddm.core import checkpoint
from ddm.expert.images import to_uint8
from ddm.expert.load import load_denoiser
from ddm.expert.model import DiT, dit_config
from ddm.expert.sampling import sample
from ddm.router.client import RouterClient
from ddm.router.config import SampleDefaults
from ddm.router.ensemble import Ensemble
from ddm.router.model import RouterConfig, RouterNet, load_router
from ddm.router.server import initial_noise
from ddm.router.strategies import GUIDANCE_MODES

GUIDANCE = 3.0
DEFAULTS = SampleDefaults()  # what the router serves a request that leaves a field unset
NUM_CLASSES = 10
IMAGE = {"image_size": 28, "in_channels": 1, "num_classes": NUM_CLASSES}


def _save(module: torch.nn.Module, directory: Path, meta: dict) -> str:
    state = module.state_dict()
    tensors = {
        **{f"model.{k}": v for k, v in state.items()},
        **{f"ema.{k}": v.clone() for k, v in state.items()},
    }
    checkpoint.save(str(directory), 1, tensors, meta)
    return str(directory)


def _perturb(module: torch.nn.Module, seed: int, std: float) -> None:
    """Random weights instead of adaLN-Zero's zeros, so every layer really computes (zero gates could
    let a kernel skip work and flatter the timing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def train_router_briefly(router: RouterNet, k: int, steps: int) -> None:
    """A few hundred steps of router training on synthetic partitions (partition = label mod K), so top-1
    spreads samples over the experts as a router trained on balanced clusters does. A random router
    sends nearly everything to one expert, which would time a one-expert system, not an ensemble."""
    opt = torch.optim.AdamW(router.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    router.train()
    for _ in range(steps):
        y = torch.randint(0, NUM_CLASSES, (64,), generator=g)
        x_0 = torch.rand(64, 1, 28, 28, generator=g) * 2 - 1
        t = torch.rand(64, generator=g)
        eps = torch.randn(x_0.shape, generator=g)
        x_t = (1 - t[:, None, None, None]) * x_0 + t[:, None, None, None] * eps
        loss = torch.nn.functional.cross_entropy(router(x_t, t, y), y % k)
        opt.zero_grad()
        loss.backward()
        opt.step()
    router.eval()


def make_run(root: Path, k: int, router_steps: int) -> tuple[list[str], str]:
    """K expert checkpoints and a router checkpoint in the run-root layout."""
    experts = []
    for i in range(k):
        cfg = dit_config("DiT-T/4", **IMAGE)
        torch.manual_seed(i)
        model = DiT(cfg)
        _perturb(model, i, 0.02)
        meta = {"kind": "expert", "name": f"expert-{i}", "arch": "DiT-T/4", "model": cfg.to_dict()}
        experts.append(_save(model, root / "experts" / f"expert-{i}" / "checkpoints", meta))
    rcfg = RouterConfig(**IMAGE, patch_size=4, hidden_size=72, depth=2, num_heads=4, num_experts=k)
    torch.manual_seed(100)
    router = RouterNet(rcfg)
    train_router_briefly(router, k, router_steps)
    router_dir = _save(
        router, root / "router" / "checkpoints", {"kind": "router", "name": "router", "model": rcfg.to_dict()}
    )
    return experts, router_dir


def serve_process(args: list[str], threads: int) -> ServerProcess:
    """A started ``ddm serve`` subprocess with ``threads`` torch threads (the stack's one helper)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    argv = [*SERVE, *args, *f"--host 127.0.0.1 --port 0 --threads {threads}".split()]
    return ServerProcess(args[0], argv, env=env, log=os.devnull).start()


class Meter:
    """Wall time and CPU time (this process + the servers) of a piece of work; see the module docstring."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def cpu(self) -> float:
        total = time.process_time()
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self.pids:
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            except (OSError, IndexError, ValueError):
                pass
        return total

    def run(self, fn: Callable[[], object]) -> tuple[float, float]:
        c0, t0 = self.cpu(), time.perf_counter()
        fn()
        return time.perf_counter() - t0, self.cpu() - c0


METER = Meter()


def timed(fn: Callable[[], object]) -> float:  # wall seconds
    return METER.run(fn)[0]


def paired(a: Callable[[], object], b: Callable[[], object], reps: int) -> dict[str, float]:
    """Alternate a and b ``reps`` times after one warm-up each: median wall times and the median
    per-pair ratios a/b of wall time and of CPU time."""
    a(), b()
    runs = [(METER.run(a), METER.run(b)) for _ in range(reps)]
    return {
        "a": statistics.median(ra[0] for ra, _ in runs),
        "b": statistics.median(rb[0] for _, rb in runs),
        "wall": statistics.median(ra[0] / rb[0] for ra, rb in runs),
        "cpu": statistics.median(ra[1] / rb[1] for ra, rb in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a few minutes)")
    parser.add_argument("--experts", type=int, default=4, help="K, number of experts (default 4)")
    parser.add_argument("--steps", type=int, help="sampler steps per request (default 8; 4 with --quick)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--client-n", type=int, default=4, help="images per client request (default 4)")
    parser.add_argument("--max-delay-ms", type=float, default=2.0, help="experts' batching delay (default 2)")
    parser.add_argument("--only-top1-cost", action="store_true",
                        help="measure only top1_cost_ratio (and its table), not the gRPC overhead or throughput")  # fmt: skip
    parser.add_argument("--start-timeout", type=float, default=300.0,
                        help="seconds each server may take to come up (default 300; a loaded machine is slow)")  # fmt: skip
    parser.add_argument("--guidance-mode", choices=GUIDANCE_MODES.names(), default=DEFAULTS.guidance_mode,
                        help=f"guidance mode of the headline top1_cost_ratio (default: the served default, "
                        f"{DEFAULTS.guidance_mode})")  # fmt: skip
    parser.add_argument("--route-every", type=int, default=DEFAULTS.route_every,
                        help=f"route_every of the headline top1_cost_ratio (default: the served default, "
                        f"{DEFAULTS.route_every})")  # fmt: skip
    args = parser.parse_args()
    k = args.experts
    args.steps = args.steps or (4 if args.quick else 8)
    args.reps, args.window = (3, 4.0) if args.quick else (7, 15.0)
    out: dict[str, object] = {"experts": k, "steps": args.steps, "guidance": GUIDANCE, "quick": args.quick}
    load_before = os.getloadavg()[0]
    servers: list[ServerProcess] = []
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        expert_dirs, router_dir = make_run(Path(tmp), k, router_steps=150 if args.quick else 400)
        try:
            expert_args = f"--max-batch 512 --max-delay-ms {args.max_delay_ms}".split()
            servers = [serve_process(["expert", "--checkpoint", d, *expert_args], 1) for d in expert_dirs]
            router_args = [
                "router",
                "--router-checkpoint",
                router_dir,
                *"--max-n 512 --max-concurrent 64".split(),
            ]
            router_args += [x for a in start_all(servers, args.start_timeout) for x in ("--expert", a)]
            servers.append(serve_process(router_args, 1))
            router_address = start_all(servers[-1:], args.start_timeout)[0]
            METER.pids = [srv.pid for srv in servers]
            print(f"{k} expert servers + a router server up, each its own process with 1 torch thread")
            run(out, router_address, expert_dirs, router_dir, args)
        finally:
            for s in servers:
                s.stop(5)
    out["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"machine load average (other jobs share these 2 cores): {out['load_average_before_after']}")
    print(json.dumps({key: round(v, 4) if isinstance(v, float) else v for key, v in out.items()}))


class InProcess:
    """The same ensemble in this process, in one of three thread set-ups (``choose`` keeps the fastest)."""

    SETUPS = {
        "1 thread, experts in turn": (1, False),
        "2 threads, experts in turn": (2, False),
        "1 thread, experts in parallel threads": (1, True),
    }

    def __init__(self, expert_dirs: list[str], router_dir: str, k: int):
        self.ensemble = Ensemble([load_denoiser(d) for d in expert_dirs], load_router(router_dir))
        self.pool = ThreadPoolExecutor(k)
        self.setup = "1 thread, experts in turn"

    def use(self, setup: str) -> None:
        threads, parallel = self.SETUPS[setup]
        torch.set_num_threads(threads)
        self.ensemble.executor = self.pool if parallel else None
        self.setup = setup

    def sampler(self, n: int, steps: int, strategy: str = "top-k") -> Callable[[], torch.Tensor]:
        y = torch.arange(n) % NUM_CLASSES

        def go() -> torch.Tensor:
            self.ensemble.strategy = strategy
            noise, gen = initial_noise(n, (1, 28, 28), 0)
            return to_uint8(sample(self.ensemble.guided(GUIDANCE), noise, y, steps=steps, generator=gen))

        return go

    def choose(self, n: int, steps: int, strategy: str) -> dict[str, float]:
        """ms per sample of each set-up at batch n (median of 3 after a warm-up); switches to the fastest."""
        times = {}
        for setup in self.SETUPS:
            self.use(setup)
            fn = self.sampler(n, steps, strategy)
            fn()
            times[setup] = 1000 * statistics.median(timed(fn) for _ in range(3)) / n
        self.use(min(times, key=times.get))
        return times


def run(out: dict, address: str, expert_dirs: list[str], router_dir: str, args: argparse.Namespace) -> None:
    k, steps, reps, window = args.experts, args.steps, args.reps, args.window
    local = InProcess(expert_dirs, router_dir, k)
    client = RouterClient(address)

    def remote(n: int, strategy: str = "top-k") -> Callable[[], object]:
        return lambda: client.sample(n, guidance=GUIDANCE, steps=steps, strategy=strategy, seed=0)

    # the served ensemble is the local one: same seed, same images
    served, _ = client.sample(16, guidance=GUIDANCE, steps=steps, seed=0)
    diff = (served.int() - local.sampler(16, steps)().int()).abs().max().item()
    print(f"served vs in-process samples (uint8, same seed): max difference {diff} levels")
    out["max_uint8_difference"] = diff
    local.ensemble.calls.reset()
    local.sampler(64, steps)()
    share = [r / max(1, local.ensemble.calls.total_rows) for r in local.ensemble.calls.rows]
    print("top-1 rows per expert (briefly trained router): " + ", ".join(f"{s:.0%}" for s in share))
    out["top1_share_per_expert"] = [round(s, 3) for s in share]

    times = "; ".join(f"{s}: {t:.2f} ms/sample" for s, t in local.choose(64, steps, "top-k").items())
    print(f"in-process set-ups at batch 64, top-1: {times}")
    print(f"in-process baseline from here on: {local.setup} (the fastest)")
    out["inprocess_setup"] = local.setup

    for n in () if args.only_top1_cost else (1, 16, 64):
        r = paired(remote(n), local.sampler(n, steps), reps * 2 if n == 1 else reps)
        print(
            f"batch {n:3d} top-1: gRPC {1000 * r['a'] / n:7.2f} ms/sample, "
            f"in process {1000 * r['b'] / n:7.2f}; "
            f"ratio {r['wall']:.3f} wall, {r['cpu']:.3f} CPU"
        )
        out[f"grpc_overhead_b{n}"] = max(r["wall"], r["cpu"])
        out[f"grpc_overhead_b{n}_wall"], out[f"grpc_overhead_b{n}_cpu"] = r["wall"], r["cpu"]
        out[f"grpc_ms_per_sample_b{n}"] = 1000 * r["a"] / n
        out[f"inprocess_ms_per_sample_b{n}"] = 1000 * r["b"] / n

    # top-1 / full for each guidance mode and route_every, both sides with the same settings (so the full
    # ensemble routes as rarely as top-1 does: the conservative ratio); the headline is the defaults'
    def remote_with(strategy: str, mode: str, every: int) -> Callable[[], object]:
        return lambda: client.sample(64, guidance=GUIDANCE, steps=steps, strategy=strategy, seed=0,
                                     guidance_mode=mode, route_every=every)  # fmt: skip

    table = {}
    for mode in GUIDANCE_MODES.names():
        for every in sorted({1, 4, args.route_every} if args.quick else {1, 2, 4, args.route_every}):
            r = paired(remote_with("top-k", mode, every), remote_with("full", mode, every), reps)
            table[f"{mode}/route_every={every}"] = r
            print(
                f"top-1 / full at batch 64, guidance_mode {mode}, route_every {every}: "
                f"{r['wall']:.3f} wall, {r['cpu']:.3f} CPU ({1000 * r['a'] / 64:.2f} / {1000 * r['b'] / 64:.2f} ms/sample)"
            )
    out["top1_cost_ratio_by_setting"] = {key: round(r["wall"], 4) for key, r in table.items()}
    out["top1_cost_ratio_cpu_by_setting"] = {key: round(r["cpu"], 4) for key, r in table.items()}
    served = table[f"{args.guidance_mode}/route_every={args.route_every}"]
    local.ensemble.guidance_mode, local.ensemble.route_every = args.guidance_mode, args.route_every
    inproc = paired(local.sampler(64, steps, "top-k"), local.sampler(64, steps, "full"), reps)
    local.ensemble.guidance_mode, local.ensemble.route_every = DEFAULTS.guidance_mode, DEFAULTS.route_every
    print(
        f"headline (guidance_mode {args.guidance_mode}, route_every {args.route_every}): top-1 / full at batch 64: "
        f"served {served['wall']:.3f} wall, {served['cpu']:.3f} CPU; in process {inproc['wall']:.3f} wall, "
        f"{inproc['cpu']:.3f} CPU; target 1.1/K = {1.1 / k:.3f}"
    )
    out["top1_cost_ratio"] = served["wall"]  # both sides served: no machine-share bias; time, as asked
    out["top1_cost_ratio_wall"], out["top1_cost_ratio_cpu"] = served["wall"], served["cpu"]
    out["top1_cost_ratio_in_process"] = inproc["wall"]
    out["guidance_mode"], out["route_every"] = args.guidance_mode, args.route_every

    if args.only_top1_cost:
        client.close()
        return
    best, best_n = 0.0, 0
    for n in (64, 128, 256):
        fn = local.sampler(n, steps)
        fn()
        rate = n / timed(fn)
        print(f"in-process top-1 throughput at batch {n}: {rate:.1f} images/s")
        if rate > best:
            best, best_n = rate, n

    def concurrent_window() -> int:
        stop_at = time.monotonic() + window
        done = [0] * args.clients

        def worker(i: int) -> None:
            while time.monotonic() < stop_at:
                client.sample(args.client_n, guidance=GUIDANCE, steps=steps, seed=i)
                done[i] += args.client_n

        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(worker, range(args.clients)))
        return sum(done)

    client.sample(args.client_n, guidance=GUIDANCE, steps=steps)  # warm
    images: list[int] = []

    def concurrent() -> None:
        images.append(concurrent_window())

    r = paired(concurrent, local.sampler(best_n, steps), 3)
    del images[0]  # paired()'s warm-up window
    # per-pair ratios of time per image invert into throughput ratios
    wall_ratio = statistics.median(images) / r["a"] / (best_n / r["b"])
    cpu_ratio = 1 / r["cpu"] * statistics.median(images) / best_n
    print(
        f"{args.clients} concurrent clients x {args.client_n} images, top-1: "
        f"{statistics.median(images) / r['a']:.1f} images/s "
        f"through the router; in process at batch {best_n}: {best_n / r['b']:.1f} images/s (alternating); "
        f"ratio {wall_ratio:.3f} wall, {cpu_ratio:.3f} per CPU second"
    )
    out["inprocess_best_images_per_s"], out["inprocess_best_batch"] = best_n / r["b"], best_n
    out["concurrent_images_per_s"] = statistics.median(images) / r["a"]
    out["concurrent_throughput_ratio"] = min(wall_ratio, cpu_ratio)
    out["concurrent_throughput_ratio_wall"], out["concurrent_throughput_ratio_cpu"] = wall_ratio, cpu_ratio
    out["clients"], out["client_n"] = args.clients, args.client_n
    out["threads"] = (
        "servers: 1 torch thread per process (K experts + router: up to K forwards at once over 2 cores); "
        f"in process: the fastest of {list(InProcess.SETUPS)} = {local.setup}; OMP_WAIT_POLICY=PASSIVE"
    )
    client.close()


if __name__ == "__main__":
    main()
