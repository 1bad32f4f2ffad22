"""Distillation benchmark: few-step students (1 and 4 steps) against the guided top-1 ensemble at 32 steps.

    python bench/distill.py --run runs/demo                   # the full table (ensemble 8/16/32, student 1/2/4/8)
    python bench/distill.py --quick --run runs/demo           # ensemble 32, student 1 and 4, 250 samples
    python bench/distill.py --run runs/demo --student DIR     # a student trained elsewhere
    python bench/distill.py --quick --run runs/demo --train shortcut,meanflow --train-steps 600
        # both objectives side by side: one student per objective, trained here with the run's [distill]
        # recipe and the same budget (resumed if already under --out), then all evaluated in one table

Uses a finished run's experts and router and its eval settings (real set, features, classifier, guidance),
and the run's distilled student (``ROOT/distill/checkpoints``) unless ``--student`` (repeatable,
``[NAME=]PATH``) or ``--train`` names others. Rows are sampled one after the other in this process, so
wall times compare. Writes grids, metrics and trained students under ``--out`` (never into the run root)
and prints the table, then, as its last line, one JSON object: the first student's figures at the top
level and every student's under ``students``:

    {"fd_ratio_4step": student FD at 4 steps / ensemble FD at 32, "fd_ratio_1step": ..., "time_ratio_4step":
     their s/sample, "student_class_accuracy_4step": ..., "students": {NAME: {...}}, ...}

Targets (issue 14): fd_ratio_4step <= 1.1, fd_ratio_1step <= 1.3, time_ratio_4step <= 0.125,
student_class_accuracy_4step within 0.03 of the ensemble's at 32 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

TARGETS = {
    "fd_ratio_4step": 1.1,
    "fd_ratio_1step": 1.3,
    "time_ratio_4step": 0.125,
    "class_accuracy_gap": 0.03,
}


def student_figures(rows: list[dict[str, Any]], ensemble: dict[str, Any]) -> dict[str, Any]:
    """One student's ratios against the 32-step ensemble row, and whether they meet TARGETS."""
    by_steps = {r["steps"]: r for r in rows}
    s1, s4 = by_steps.get(1), by_steps.get(4)

    def ratio(r: dict[str, Any] | None, key: str) -> float | None:
        return None if r is None else round(r[key] / ensemble[key], 4)

    acc, acc_e = (s4 or {}).get("class_accuracy"), ensemble["class_accuracy"]
    out = {
        "fd_ratio_4step": ratio(s4, "fd"),
        "fd_ratio_1step": ratio(s1, "fd"),
        "time_ratio_4step": ratio(s4, "seconds_per_sample"),
        "student_class_accuracy_4step": acc,
        "student_fd_4step": None if s4 is None else s4["fd"],
        "student_fd_1step": None if s1 is None else s1["fd"],
        "student_ms_per_sample_4step": None if s4 is None else round(1000 * s4["seconds_per_sample"], 3),
        "student_class_accuracy_1step": None if s1 is None else s1["class_accuracy"],
    }
    checks = [
        out["fd_ratio_4step"] is not None and out["fd_ratio_4step"] <= TARGETS["fd_ratio_4step"],
        out["fd_ratio_1step"] is not None and out["fd_ratio_1step"] <= TARGETS["fd_ratio_1step"],
        out["time_ratio_4step"] is not None and out["time_ratio_4step"] <= TARGETS["time_ratio_4step"],
        acc is not None and acc_e is not None and acc_e - acc <= TARGETS["class_accuracy_gap"],
    ]
    out["targets_met"] = all(checks)
    return out


def parse_students(values: list[str]) -> list[tuple[str | None, str]]:
    """``[NAME=]PATH`` -> (NAME or None, PATH)."""
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        out.append((name, path) if sep and "/" not in name else (None, v))
    return out


def train_students(
    cfg: Any, objectives: list[str], steps: int | None, out: str, say: Any
) -> list[tuple[str, str]]:
    """One student per objective with the run's [distill] recipe (``steps`` overrides train.steps), each
    under OUT/students/OBJECTIVE (a finished one is kept, an interrupted one resumes)."""
    from ddm.coordinator.distill_stage import distill_job
    from ddm.coordinator.pipeline import expert_names, expert_output
    from ddm.coordinator.stages import router_checkpoint
    from ddm.core import checkpoint, storage
    from ddm.router.distill import train
    from ddm.router.distill_objectives import OBJECTIVES

    base = distill_job(cfg, [expert_output(cfg, n) for n in expert_names(cfg)], router_checkpoint(cfg))
    students = []
    for name in objectives:
        OBJECTIVES.check(name)
        output = os.path.join(out, "students", name)
        job = base.model_copy(
            update={
                "name": f"student-{name}",
                "output": output,
                "shortcut": base.shortcut.model_copy(update={"objective": name}),
                "train": base.train.model_copy(update={"steps": steps or base.train.steps}),
            }
        )
        started = time.perf_counter()
        result = train(job, progress=False)
        say(f"[bench] student {name}: {result.step} steps in {time.perf_counter() - started:.0f} s "
            f"(loss {result.losses[-1] if result.losses else float('nan'):.4f})")  # fmt: skip
        students.append((name, checkpoint.latest(storage.join(output, "checkpoints"))))
    return students


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="finished experts-mode run root (default runs/demo)")
    p.add_argument(
        "--student",
        action="append",
        default=[],
        help="[NAME=]student checkpoint (repeatable; default: RUN/distill)",
    )
    p.add_argument(
        "--train", help="comma-separated objectives: train one student each here (e.g. shortcut,meanflow)"
    )
    p.add_argument(
        "--train-steps",
        type=int,
        help="training steps per --train student (default: the run's distill.train.steps)",
    )
    p.add_argument("--quick", action="store_true", help="ensemble 32 and student 1 and 4 steps, 250 samples")
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

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

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
    out = args.out or os.path.join("runs", "bench-distill", cfg.name + ("-quick" if args.quick else ""))
    router = checkpoint.latest(storage.join(router_output(cfg), "checkpoints"))
    if router is None:
        print(f"bench/distill.py: {args.run} has no router", file=sys.stderr)
        return 2
    started = time.perf_counter()
    students = parse_students(args.student)
    if args.train:
        students += train_students(
            cfg, [o.strip() for o in args.train.split(",")], args.train_steps, out, say
        )
    if not students:
        students = [(None, student_checkpoint(args.run))]
    if any(url is None for _, url in students):
        print(
            f"bench/distill.py: {args.run} has no student (run the distill stage or pass --student)",
            file=sys.stderr,
        )
        return 2
    named: list[tuple[str, str]] = []
    for name, url in students:  # each student's label: given, else its objective; made unique
        label = name or objective_of(url)
        label = label if label not in dict(named) else f"{label}-{len(named) + 1}"
        named.append((label, url))
    context = eval_context(cfg, progress=False, placement=placement)
    context["num_samples"] = args.num_samples or (250 if args.quick else cfg.eval.num_samples)
    experts = load_experts({n: expert_output(cfg, n) for n in expert_names(cfg)}, placement, purpose="bench")
    rows: list[dict[str, Any]] = []
    per_student: dict[str, list[dict[str, Any]]] = {}
    for i, (name, url) in enumerate(named):
        table = distill_table(
            experts=experts, router_url=router, student_url=url, context=context,
            ensemble_steps=([32] if args.quick else [8, 16, 32]) if i == 0 else [],
            student_steps=[1, 4] if args.quick else [1, 2, 4, 8], guidance=cfg.eval.sample.guidance,
            out_dir=os.path.join(out, name), say=say, placement=placement,
        )  # fmt: skip
        for r in table["rows"]:
            if r["model"] == "student":
                r["name"] = f"student ({name})"
                per_student.setdefault(name, []).append(r)
            rows.append(r)
    print(markdown_table(rows), end="")
    e32 = next(r for r in rows if r["model"] == "ensemble" and r["steps"] == 32)
    figures = {name: student_figures(per_student[name], e32) for name, _ in named}
    first = figures[named[0][0]]
    summary = {
        **{k: v for k, v in first.items() if k != "targets_met"},
        "ensemble_fd_32step": e32["fd"],
        "ensemble_ms_per_sample_32step": round(1000 * e32["seconds_per_sample"], 3),
        "ensemble_class_accuracy_32step": e32["class_accuracy"],
        "students": {name: {**figures[name], "checkpoint": url} for name, url in named},
        "num_samples": context["num_samples"],
        "guidance": cfg.eval.sample.guidance,
        "student": named[0][1],
        "run": args.run,
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "targets_met": first["targets_met"],
    }
    print(json.dumps(summary))
    return 0


def objective_of(url: str) -> str:
    """A student checkpoint's objective, from its metadata (a student from before objectives: shortcut)."""
    from ddm.core import checkpoint

    meta = checkpoint.load(url).meta
    return (meta.get("shortcut") or {}).get("objective", "shortcut")


if __name__ == "__main__":
    raise SystemExit(main())
