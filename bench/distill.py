"""Distillation benchmark: the student at 4 steps against the guided top-1 ensemble at 32 steps.

    python bench/distill.py --run runs/demo                   # the full table (ensemble 8/16/32, student 1/2/4/8)
    python bench/distill.py --quick --run runs/demo           # ensemble 32 and student 4 only, 250 samples
    python bench/distill.py --run runs/demo --student DIR     # a student trained elsewhere

Uses a finished run's experts and router and its eval settings (real set, features, classifier, guidance),
and the run's distilled student (``ROOT/distill/checkpoints``) unless ``--student`` names another. Rows are
sampled one after the other in this process, so wall times compare. Writes grids and metrics under
``--out`` (never into the run root) and prints the table, then, as its last line, one JSON object:

    {"fd_ratio_4step": student FD at 4 steps / ensemble FD at 32, "time_ratio_4step": their s/sample, ...}

Targets (issue 5): fd_ratio_4step <= 1.1 at time_ratio_4step <= 0.125.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="finished experts-mode run root (default runs/demo)")
    p.add_argument("--student", help="student checkpoint (default: RUN/distill/checkpoints)")
    p.add_argument("--quick", action="store_true", help="two rows (ensemble 32, student 4) at 250 samples")
    p.add_argument(
        "--num-samples", type=int, help="images per row (default: 250 quick, else the run's eval.num_samples)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", help="output folder (default: runs/bench-distill/RUN_NAME)")
    from ddm.core.device import add_argument as add_device_argument

    add_device_argument(p)
    args = p.parse_args(argv)

    import torch

    from ddm.coordinator.config import RunConfig
    from ddm.coordinator.distill_stage import distill_table, markdown_table, student_checkpoint
    from ddm.coordinator.eval_stage import eval_context, load_experts
    from ddm.coordinator.manifest import Manifest
    from ddm.coordinator.pipeline import expert_names, expert_output, router_output
    from ddm.core import checkpoint, storage
    from ddm.core.placement import Placement

    torch.set_num_threads(args.threads)
    placement = Placement.resolve(args.device, field="--device")
    manifest = Manifest.load(args.run)
    cfg = RunConfig.model_validate({**manifest.data["config"], "root": args.run})
    if cfg.mode != "experts":
        print(
            f"bench/distill.py: {args.run} is a {cfg.mode} run; distillation needs an experts run",
            file=sys.stderr,
        )
        return 2
    student = args.student or student_checkpoint(args.run)
    router = checkpoint.latest(storage.join(router_output(cfg), "checkpoints"))
    if student is None or router is None:
        missing = "student (run the distill stage or pass --student)" if student is None else "router"
        print(f"bench/distill.py: {args.run} has no {missing}", file=sys.stderr)
        return 2
    context = eval_context(cfg, progress=False, placement=placement)
    context["num_samples"] = args.num_samples or (250 if args.quick else cfg.eval.num_samples)
    out = args.out or os.path.join("runs", "bench-distill", cfg.name + ("-quick" if args.quick else ""))
    started = time.perf_counter()
    table = distill_table(
        experts=load_experts(
            {n: expert_output(cfg, n) for n in expert_names(cfg)}, placement, purpose="bench"
        ),
        router_url=router,
        student_url=student,
        context=context,
        ensemble_steps=[32] if args.quick else [8, 16, 32],
        student_steps=[4] if args.quick else [1, 2, 4, 8],
        guidance=cfg.eval.sample.guidance,
        out_dir=out,
        say=lambda msg: print(msg, file=sys.stderr, flush=True),
        placement=placement,
    )
    print(markdown_table(table["rows"]), end="")
    e32 = next(r for r in table["rows"] if r["model"] == "ensemble" and r["steps"] == 32)
    s4 = next(r for r in table["rows"] if r["model"] == "student" and r["steps"] == 4)
    summary = {
        "fd_ratio_4step": table["fd_ratio_4step"],
        "time_ratio_4step": table["time_ratio_4step"],
        "student_fd_4step": s4["fd"],
        "ensemble_fd_32step": e32["fd"],
        "student_ms_per_sample_4step": round(1000 * s4["seconds_per_sample"], 3),
        "ensemble_ms_per_sample_32step": round(1000 * e32["seconds_per_sample"], 3),
        "student_class_accuracy_4step": s4["class_accuracy"],
        "ensemble_class_accuracy_32step": e32["class_accuracy"],
        "num_samples": context["num_samples"],
        "guidance": table["guidance"],
        "student": student,
        "run": args.run,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "targets_met": table["fd_ratio_4step"] <= 1.1 and table["time_ratio_4step"] <= 0.125,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
