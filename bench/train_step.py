"""Training-step benchmark: our trainer against a bare PyTorch loop, and against the machine's matmul.

    python bench/train_step.py [--quick] [--arch DiT-T/4] [--batch-size 128] [--threads N]

Measures, in one process and on the same model and batch size:
  * torch.mm FLOP/s (fp32 and bf16, 1024x1024), the machine's practical peak, once up front and again
    between every pair of steps (the MFU of each step is taken against the matmul rate measured right
    next to it, so other load on a shared machine moves both alike);
  * our trainer (``ddm.expert.trainer.train``, the one ``ddm.core.trainer.Trainer`` on Fashion-MNIST, with EMA, clipping, label dropout,
    seeded per-step randomness, metrics rows) and a bare loop (forward, loss, backward, AdamW step on a
    fixed batch), *interleaved step by step*: the trainer's ``on_step`` callback runs one bare step, so
    both see the same machine state (shared cores, thermal drift), and each pair gives one ratio;
  * the same with bf16 autocast;
  * the router and the student trainers (the same ``Trainer``) against their own bare loops the same way
    (router: forward, cross-entropy, backward, AdamW; student: the guided partition teacher, the shortcut
    bootstrap passes, forward, backward, AdamW), fp32: ``overhead_ratio_router``, ``overhead_ratio_student``;
  * FSDP2 against DDP, each a real 2-process torchrun (gloo on the CPU) of the same expert job:
    ``fsdp_step_ratio`` = FSDP step time / DDP step time (medians over the metrics rows after warm-up).

Checkpoint writes are outside the measured window (every 500 steps by default they cost ~0.1 ms/step).
Prints readable lines, then one JSON object as the LAST line:
  images_per_s, mfu, overhead_ratio, peak_rss_mb, images_per_s_bf16, mfu_bf16, overhead_ratio_bf16,
  overhead_ratio_router, overhead_ratio_student, fsdp_step_ratio, faster, mm_gflops, mm_gflops_bf16,
  bare_images_per_s, bare_images_per_s_bf16, ...
MFU = DiT.flops_per_image() x 3 (forward + backward) x images/s / matmul FLOP/s of the same dtype
(median over steps of the per-step ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from ddm.core.device import autocast
from ddm.core.trainer import build_optimizer
from ddm.expert import flow
from ddm.expert.config import ExpertJobConfig
from ddm.expert.data import FASHION_MNIST_CLASSES, build_training_dataset
from ddm.expert.trainer import build_model, model_config, train
from ddm.router.config import RouterJobConfig
from ddm.router.distill_config import DistillJobConfig

FASHION_MNIST_N = len(FASHION_MNIST_CLASSES)  # the bench partitions' classes


class MatmulProbe:
    """torch.mm FLOP/s of an n x n product in one dtype: the machine's practical peak right now."""

    def __init__(self, dtype: torch.dtype, n: int = 1024):
        self.n = n
        self.a, self.b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        for _ in range(3):
            torch.mm(self.a, self.b)

    def rate(self, reps: int = 2) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(self.a, self.b)
        return reps * 2 * self.n**3 / (time.perf_counter() - t0)

    def sustained(self, seconds: float = 1.5) -> float:
        rates: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(rates) < 5:
            rates.append(self.rate(4))
        return statistics.median(rates)


class BareLoop:
    """The reference: forward, flow loss, backward, AdamW step, on one fixed batch; nothing else."""

    def __init__(self, job: ExpertJobConfig):
        cfg = model_config(job, build_training_dataset(job.data))  # what the data leaves unset
        self.model = build_model(cfg, job.train.seed)
        self.optimizer = build_optimizer(self.model, job.train)
        g = torch.Generator().manual_seed(1)
        b = job.train.batch_size
        self.x_0 = torch.rand((b, cfg.in_channels, cfg.image_size, cfg.image_size), generator=g) * 2 - 1
        self.eps = torch.randn(self.x_0.shape, generator=g)
        self.t = torch.rand(b, generator=g)
        self.y = torch.randint(0, cfg.num_classes + 1, (b,), generator=g)
        self.precision = job.train.precision

    def step(self) -> None:
        x_t = flow.interpolate(self.x_0, self.eps, self.t)
        with autocast(self.precision, torch.device("cpu")):  # the trainer's, so the compute is equal
            v_pred = self.model(x_t, self.t, self.y)
        loss = flow.flow_loss(v_pred, self.x_0, self.eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class BareRouter:
    """The router's reference: forward, cross-entropy, backward, AdamW step, on one fixed batch."""

    def __init__(self, job: RouterJobConfig, shape: tuple[int, int, int]):
        from ddm.router.model import router_config
        from ddm.router.trainer import build_router

        c, h, _ = shape
        cfg = router_config(job.model.arch, image_size=h, in_channels=c, num_classes=job.model.num_classes or FASHION_MNIST_N,
                            num_experts=job.data.k)  # fmt: skip
        self.model = build_router(cfg, job.train.seed)
        self.optimizer = build_optimizer(self.model, job.train)
        g = torch.Generator().manual_seed(1)
        b = job.train.batch_size
        self.x_t = torch.randn((b, *shape), generator=g)
        self.t = torch.rand(b, generator=g)
        self.y = torch.randint(0, cfg.num_classes + 1, (b,), generator=g)
        self.k = torch.randint(0, cfg.num_experts, (b,), generator=g)

    def step(self) -> None:
        loss = torch.nn.functional.cross_entropy(self.model(self.x_t, self.t, self.y).float(), self.k)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class BareStudent:
    """The student's reference on one fixed batch: the guided partition teacher on the teacher rows, the
    two no-grad shortcut passes on the bootstrap rows, then forward, loss, backward, AdamW step."""

    def __init__(self, job: DistillJobConfig, shape: tuple[int, int, int]):
        from ddm.router.distill import build_student, load_experts, partition_weights, student_config

        cfg = student_config(job, shape, FASHION_MNIST_N)
        self.model = build_student(job, cfg)
        self.optimizer = build_optimizer(self.model, job.train)
        self.experts = load_experts(job.experts, cfg.num_classes)
        g = torch.Generator().manual_seed(1)
        b = job.train.batch_size
        self.n_boot = round(b * job.shortcut.fraction)
        self.n_flow = b - self.n_boot
        self.x_t = torch.randn((b, *shape), generator=g)
        self.t = torch.rand(b, generator=g)
        self.y = torch.randint(0, cfg.num_classes, (b,), generator=g)
        self.w = 1 + 4 * torch.rand(b, generator=g)
        self.d = torch.cat([torch.zeros(self.n_flow), torch.full((self.n_boot,), 0.5)])
        self.weights = partition_weights(
            torch.randint(0, len(self.experts), (self.n_flow,), generator=g), len(self.experts)
        )
        self.min_step = job.shortcut.min_step

    def step(self) -> None:
        from ddm.router.distill import teacher_velocity
        from ddm.router.distill_objectives import shortcut_target

        f, b = slice(0, self.n_flow), slice(self.n_flow, None)
        student = lambda x, t, y, w, d: self.model(x, t, y, w=w, d=d).float()  # noqa: E731
        target = teacher_velocity(self.experts, self.x_t[f], self.t[f], self.y[f], self.weights, self.w[f])
        boot = shortcut_target(
            student, self.x_t[b], self.t[b], self.y[b], self.w[b], self.d[b], self.min_step
        )
        v_pred = student(self.x_t, self.t, self.y, self.w, self.d)
        loss = torch.mean((v_pred - torch.cat([target, boot])) ** 2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def interleaved(
    run: Callable[[Callable[[int], None]], Any],
    bare: Any,
    steps: int,
    warmup: int,
    probe: MatmulProbe,
    flops_per_step: float,
) -> dict[str, Any]:
    """Run a trainer (``run(on_step)``) for ``steps`` steps; after each, one bare step and one matmul probe."""
    trainer_s: list[float] = []
    bare_s: list[float] = []
    mm_rate: list[float] = []
    last_end = [0.0]

    def on_step(step: int) -> None:
        start = time.perf_counter()
        if step > 1:
            trainer_s.append(start - last_end[0])  # everything the trainer did since the last callback
        bare.step()
        bare_s.append(time.perf_counter() - start)
        mm_rate.append(probe.rate())
        last_end[0] = time.perf_counter()

    result = run(on_step)
    assert result.step == steps
    # trainer_s[i] is step i + 2; bare_s[i] and mm_rate[i] were measured right before it (after step
    # i + 1). Drop warm-up, and the final step (it includes the checkpoint write).
    rows = list(zip(trainer_s, bare_s[:-1], mm_rate[:-1], strict=True))[warmup:-1]
    return {
        "trainer_s": statistics.median(t for t, _, _ in rows),
        "bare_s": statistics.median(b for _, b, _ in rows),
        "ratio_median": statistics.median(t / b for t, b, _ in rows),
        "ratio_of_sums": sum(t for t, _, _ in rows) / sum(b for _, b, _ in rows),
        "mfu": statistics.median(flops_per_step / t / mm for t, _, mm in rows),
        "mm_flops": statistics.median(mm for _, _, mm in rows),
        "pairs": len(rows),
        "final_loss": result.final_loss,
    }


def expert_pair(job: ExpertJobConfig, warmup: int, probe: MatmulProbe) -> dict[str, Any]:
    bare = BareLoop(job)
    flops = 3 * bare.model.flops_per_image() * job.train.batch_size
    return interleaved(lambda on_step: train(job, progress=False, on_step=on_step), bare, job.train.steps, warmup,
                       probe, flops)  # fmt: skip


def write_partitions(root: str, n: int) -> tuple[int, int, int]:
    """Fashion-MNIST's first n images as two partitions (classes 0-4, 5-9); returns the image shape."""
    from ddm.expert.data import load_fashion_mnist
    from ddm.expert.shards import write_shards

    ds = load_fashion_mnist(limit=n)
    for k, sel in enumerate((ds.labels < 5, ds.labels >= 5)):
        part = ds.subset(sel)
        write_shards(f"{root}/partitions/expert-{k}", part.images, part.labels, part.ids, num_classes=10)
    return ds.image_shape


def router_and_student(
    tmp: str, args: argparse.Namespace, steps: int, warmup: int, probe: MatmulProbe
) -> dict[str, Any]:
    """overhead_ratio_router and overhead_ratio_student on two Fashion-MNIST partitions (fp32)."""
    from ddm.router.distill import train as train_student
    from ddm.router.trainer import train as train_router

    shape = write_partitions(tmp, 4 * args.batch_size)
    common = {"batch_size": args.batch_size, "steps": steps, "checkpoint_every": 10**6, "precision": "fp32",
              "num_threads": args.threads or None}  # fmt: skip
    router = RouterJobConfig.model_validate({
        "name": "bench-router", "output": f"{tmp}/router", "data": {"root": tmp, "k": 2}, "train": common,
        "eval": {"bins": 2, "samples_per_bin": 16},
    })  # fmt: skip
    r = interleaved(lambda on_step: train_router(router, progress=False, on_step=on_step),
                    BareRouter(router, shape), steps, warmup, probe, 0.0)  # fmt: skip
    experts = []
    for k in range(2):  # untrained experts are teachers enough for timing
        job = ExpertJobConfig.model_validate({
            "name": f"bench-expert-{k}", "output": f"{tmp}/expert-{k}", "model": {"arch": args.arch},
            "data": {"source": "shards", "path": f"{tmp}/partitions/expert-{k}"},
            "train": {**common, "steps": 1, "batch_size": 8},
        })  # fmt: skip
        train(job, progress=False)
        experts.append(f"{tmp}/expert-{k}/checkpoints")
    student = DistillJobConfig.model_validate({
        "name": "bench-student", "output": f"{tmp}/student", "experts": experts, "data": {"root": tmp, "k": 2},
        "model": {"arch": args.arch}, "train": common,
    })  # fmt: skip
    s = interleaved(lambda on_step: train_student(student, progress=False, on_step=on_step),
                    BareStudent(student, shape), steps, warmup, probe, 0.0)  # fmt: skip
    return {"router": r, "student": s}


def fsdp_vs_ddp(tmp: str, args: argparse.Namespace, steps: int, warmup: int) -> dict[str, float]:
    """Median step time of 2-process FSDP over 2-process DDP (gloo), each a real torchrun of one job."""
    from ddm.core.config import to_toml
    from ddm.core.metrics_log import read_rows

    out: dict[str, float] = {}
    for parallelism in ("ddp", "fsdp"):
        job = ExpertJobConfig.model_validate({
            "name": f"bench-{parallelism}", "output": f"{tmp}/{parallelism}", "model": {"arch": args.arch},
            "train": {"batch_size": args.batch_size, "steps": steps + warmup, "checkpoint_every": 10**6,
                      "log_every": 1, "precision": "fp32", "parallelism": parallelism, "num_threads": 1},
        })  # fmt: skip
        path = f"{tmp}/{parallelism}.toml"
        with open(path, "w") as f:
            f.write(to_toml(job.model_dump(mode="json")))
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([*torchrun, "-m", "ddm.train", "--config", path, "--no-progress"], env=env,
                              capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{parallelism} torchrun failed:\n{done.stderr[-3000:]}")
        elapsed = [r["elapsed_s"] for r in read_rows(f"{tmp}/{parallelism}/metrics.csv")]
        out[parallelism] = statistics.median(b - a for a, b in zip(elapsed[warmup:-1], elapsed[warmup + 1 :]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (one to two minutes on 2 cores)")
    parser.add_argument("--arch", default="DiT-T/4", help="DiT size (the demo default: DiT-T/4)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (demo default 128)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: on a shared 2-core machine two OpenMP threads waiting on each "
        "other ran a step 3x slower than one; 0 = torch's choice)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=int, default=None, help="measured step pairs per precision (overrides --quick)"
    )
    parser.add_argument(
        "--precisions", default="fp32,bf16",
        help="expert precisions to measure (a CPU without bf16 matmul units runs bf16 ~30x slower: fp32)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = args.steps or (16 if args.quick else 80)
    warmup = 3

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.arch}, batch {args.batch_size}"
    )
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    probes = {
        p: MatmulProbe(dtypes[p]) for p in {"fp32", *args.precisions.split(",")}
    }  # fp32: router, student
    rates = ", ".join(f"{p} {probe.sustained() / 1e9:.1f} GFLOP/s" for p, probe in probes.items())
    print(f"torch.mm 1024^2 before training: {rates}")

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            job = ExpertJobConfig.model_validate(
                {
                    "name": f"bench-{precision}",
                    "output": f"{tmp}/{precision}",
                    "model": {"arch": args.arch},
                    "train": {
                        "batch_size": args.batch_size,
                        "steps": pairs + warmup + 2,
                        "checkpoint_every": 10**6,
                        "precision": precision,
                        "num_threads": args.threads or None,
                    },
                }
            )
            m = expert_pair(job, warmup, probes[precision])
            ips = args.batch_size / m["trainer_s"]
            bare_ips = args.batch_size / m["bare_s"]
            print(
                f"{precision}: trainer {m['trainer_s'] * 1e3:.1f} ms/step ({ips:.1f} img/s), "
                f"bare loop {m['bare_s'] * 1e3:.1f} ms/step ({bare_ips:.1f} img/s); "
                f"overhead ratio {m['ratio_median']:.3f} (median of {m['pairs']} interleaved pairs; "
                f"ratio of sums {m['ratio_of_sums']:.3f}); MFU {m['mfu']:.1%} of {precision} torch.mm "
                f"at {m['mm_flops'] / 1e9:.1f} GFLOP/s measured alongside"
            )
            suffix = "" if precision == "fp32" else "_bf16"
            out.update(
                {
                    f"images_per_s{suffix}": ips,
                    f"mfu{suffix}": m["mfu"],
                    f"overhead_ratio{suffix}": m["ratio_median"],
                    f"overhead_ratio_of_sums{suffix}": m["ratio_of_sums"],
                    f"bare_images_per_s{suffix}": bare_ips,
                    f"trainer_ms_per_step{suffix}": m["trainer_s"] * 1e3,
                    f"mm_gflops{suffix}": m["mm_flops"] / 1e9,
                }
            )
        others = router_and_student(tmp, args, pairs + warmup + 2, warmup, probes["fp32"])
        for name, m in others.items():
            print(f"{name}: trainer {m['trainer_s'] * 1e3:.1f} ms/step, bare loop {m['bare_s'] * 1e3:.1f} ms/step; "
                  f"overhead ratio {m['ratio_median']:.3f} (median of {m['pairs']} interleaved pairs)")  # fmt: skip
            out[f"overhead_ratio_{name}"] = m["ratio_median"]
            out[f"overhead_ratio_of_sums_{name}"] = m["ratio_of_sums"]
        fsdp = fsdp_vs_ddp(tmp, args, max(8, pairs // 2), warmup)
        out["fsdp_step_ratio"] = fsdp["fsdp"] / fsdp["ddp"]
        out["fsdp_ms_per_step"], out["ddp_ms_per_step"] = fsdp["fsdp"] * 1e3, fsdp["ddp"] * 1e3
        print(f"2 processes (gloo): FSDP {fsdp['fsdp'] * 1e3:.1f} ms/step, DDP {fsdp['ddp'] * 1e3:.1f} ms/step; "
              f"ratio {out['fsdp_step_ratio']:.3f}")  # fmt: skip
    if "images_per_s_bf16" in out and "images_per_s" in out:
        out["faster"] = "bf16" if out["images_per_s_bf16"] > out["images_per_s"] else "fp32"
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    out.update(arch=args.arch, batch_size=args.batch_size, threads=torch.get_num_threads(), pairs=pairs)
    if "faster" in out:
        print(f"{out['faster']} is faster ({out['images_per_s_bf16'] / out['images_per_s']:.2f}x bf16/fp32)")
    print(f"peak RSS {out['peak_rss_mb']:.0f} MB")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
