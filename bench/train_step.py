"""Training-step benchmark: our trainer against a bare PyTorch loop, and against the machine's matmul.

    python bench/train_step.py [--quick] [--arch DiT-T/4] [--batch-size 128] [--threads N]

Measures, in one process and on the same model and batch size:
  * torch.mm FLOP/s (fp32 and bf16, 1024x1024), the machine's practical peak, once up front and again
    between every pair of steps (the MFU of each step is taken against the matmul rate measured right
    next to it, so other load on a shared machine moves both alike);
  * our trainer (``ddm.expert.trainer.train`` on Fashion-MNIST, with EMA, clipping, label dropout,
    seeded per-step randomness, metrics rows) and a bare loop (forward, loss, backward, AdamW step on a
    fixed batch), *interleaved step by step*: the trainer's ``on_step`` callback runs one bare step, so
    both see the same machine state (shared cores, thermal drift), and each pair gives one ratio;
  * the same with bf16 autocast.

Checkpoint writes are outside the measured window (every 500 steps by default they cost ~0.1 ms/step).
Prints readable lines, then one JSON object as the LAST line:
  images_per_s, mfu, overhead_ratio, peak_rss_mb, images_per_s_bf16, mfu_bf16, overhead_ratio_bf16,
  faster, mm_gflops, mm_gflops_bf16, bare_images_per_s, bare_images_per_s_bf16, ...
MFU = DiT.flops_per_image() x 3 (forward + backward) x images/s / matmul FLOP/s of the same dtype
(median over steps of the per-step ratio).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from ddm.expert import flow
from ddm.expert.config import ExpertJobConfig
from ddm.expert.trainer import build_model, build_optimizer, model_config, precision_context, train


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
        cfg = model_config(job)
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
        with precision_context(self.precision, torch.device("cpu")):  # the trainer's, so the compute is equal
            v_pred = self.model(x_t, self.t, self.y)
        loss = flow.flow_loss(v_pred, self.x_0, self.eps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def interleaved(job: ExpertJobConfig, warmup: int, probe: MatmulProbe) -> dict[str, Any]:
    """Run the trainer for job.train.steps steps; after each, one bare step and one matmul probe."""
    bare = BareLoop(job)
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

    result = train(job, progress=False, on_step=on_step)
    assert result.step == job.train.steps
    # trainer_s[i] is step i + 2; bare_s[i] and mm_rate[i] were measured right before it (after step
    # i + 1). Drop warm-up, and the final step (it includes the checkpoint write).
    rows = list(zip(trainer_s, bare_s[:-1], mm_rate[:-1], strict=True))[warmup:-1]
    flops_per_step = 3 * bare.model.flops_per_image() * job.train.batch_size
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = args.steps or (16 if args.quick else 80)
    warmup = 3

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.arch}, batch {args.batch_size}"
    )
    probes = {"fp32": MatmulProbe(torch.float32), "bf16": MatmulProbe(torch.bfloat16)}
    mm32, mm16 = probes["fp32"].sustained(), probes["bf16"].sustained()
    print(f"torch.mm 1024^2 before training: fp32 {mm32 / 1e9:.1f} GFLOP/s, bf16 {mm16 / 1e9:.1f} GFLOP/s")

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "bf16"):
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
            m = interleaved(job, warmup, probes[precision])
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
    out["faster"] = "bf16" if out["images_per_s_bf16"] > out["images_per_s"] else "fp32"
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    out.update(arch=args.arch, batch_size=args.batch_size, threads=torch.get_num_threads(), pairs=pairs)
    print(
        f"{out['faster']} is faster ({out['images_per_s_bf16'] / out['images_per_s']:.2f}x bf16/fp32); "
        f"peak RSS {out['peak_rss_mb']:.0f} MB"
    )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
