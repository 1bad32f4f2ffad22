"""The ``distill`` stage of ``ddm run``: train the student as a TorchX job, then the distillation table.

The job (``python -m ddm.router.distill_train``) reads the run's partitions and expert checkpoints and
writes ``{root}/distill/`` (job.toml, checkpoints/, metrics.csv, loss.png). The table evaluates, in one
process and one run so wall times compare, the guided top-1 ensemble at ``distill.eval.ensemble_steps``
and the student at ``distill.eval.student_steps`` with the run's eval settings (real set, features,
classifier, guidance): FD, KID, precision/recall, class accuracy, expert calls and wall time per
sample. Outputs under ``{root}/distill/eval/``: one folder per row (samples.png, metrics.json), and
``table.json`` / ``table.md`` with the benchmark's two ratios. The table's networks (experts, router,
student, feature extractor, classifier) run on the run's ``device``, resolved once by the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ddm.core import checkpoint, storage
from ddm.core.placement import Placement

TABLE_JSON = "table.json"
TABLE_MD = "table.md"


def distill_output(root: str) -> str:
    return storage.join(root, "distill")


def distill_job(cfg: Any, expert_dirs: list[str], router_url: str | None) -> Any:
    """The DistillJobConfig of a run (``cfg``: its RunConfig)."""
    from ddm.router.distill_config import DistillJobConfig, TeacherConfig

    dc = cfg.distill
    teacher = TeacherConfig(
        **dc.teacher.model_dump(), router=router_url if dc.teacher.kind == "ensemble" else None
    )
    return DistillJobConfig(
        name="student",
        output=distill_output(cfg.root),
        experts=[storage.join(d, "checkpoints") for d in expert_dirs],
        data=_partitions(cfg.root, expert_dirs),
        model=dc.model,
        teacher=teacher,
        shortcut=dc.shortcut,
        train=dc.train,
    )


def _partitions(root: str, expert_dirs: list[str]) -> Any:
    """The experts' own partitions: ``root`` and k for expert-0 .. expert-{k-1}; listed by name after an
    add-expert / retire-expert changed the set (``ddm.coordinator.lineage``)."""
    from ddm.router.config import RouterDataConfig

    names = [d.rstrip("/").rsplit("/", 1)[-1] for d in expert_dirs]
    if names == [f"expert-{k}" for k in range(len(names))]:
        return RouterDataConfig(root=root, k=len(names))
    return RouterDataConfig(partitions=[storage.join(root, "partitions", n) for n in names])


def student_checkpoint(root: str) -> str | None:
    return checkpoint.latest(storage.join(distill_output(root), "checkpoints"))


def row_summary(name: str, kind: str, steps: int, result: Any, *, router_calls: int) -> dict[str, Any]:
    return {
        "name": name,
        "model": kind,
        "steps": steps,
        "fd": round(result.fd, 4),
        "kid": round(result.kid_mean, 6),
        "precision": round(result.precision, 4),
        "recall": round(result.recall, 4),
        "class_accuracy": None if result.class_accuracy is None else round(result.class_accuracy, 4),
        "expert_calls_per_sample": round(result.denoiser_calls_per_sample, 3),
        "router_calls_per_sample": router_calls,
        "seconds_per_sample": result.seconds_per_image,
        "num_samples": result.num_samples,
    }


def ratios(
    rows: list[dict[str, Any]], student_steps: int = 4, ensemble_steps: int = 32
) -> dict[str, float | None]:
    """fd_ratio_4step and time_ratio_4step: the student at 4 steps over the guided top-1 ensemble at 32."""
    s = next((r for r in rows if r["model"] == "student" and r["steps"] == student_steps), None)
    e = next((r for r in rows if r["model"] == "ensemble" and r["steps"] == ensemble_steps), None)
    if s is None or e is None:
        return {"fd_ratio_4step": None, "time_ratio_4step": None}
    return {
        "fd_ratio_4step": round(s["fd"] / e["fd"], 4),
        "time_ratio_4step": round(s["seconds_per_sample"] / e["seconds_per_sample"], 4),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| model | steps | FD | KID | precision | recall | class acc. | expert calls / sample | router calls / sample | ms / sample |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        acc = "-" if r["class_accuracy"] is None else f"{r['class_accuracy']:.3f}"
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['fd']:.2f} | {r['kid']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {acc} | {r['expert_calls_per_sample']:g} | {r['router_calls_per_sample']} | {1000 * r['seconds_per_sample']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def distill_table(
    *,
    experts: list,
    router_url: str | None,
    student_url: str,
    context: dict[str, Any],
    ensemble_steps: list[int],
    student_steps: list[int],
    guidance: float,
    out_dir: str,
    say: Callable[[str], None] = print,
    placement: Placement | None = None,
) -> dict[str, Any]:
    """Evaluate every row into ``out_dir``/NAME and write table.json / table.md there; returns the table.

    ``context``: ``evaluate``'s shared keyword arguments (``eval_stage.eval_context``); its
    ``sample_cfg`` gives the sampler, with steps and guidance set per row here. The router and the
    student load on ``placement`` (default: the CPU), which must be where ``experts`` and ``context`` are.
    """
    placement = placement or Placement.cpu()
    from ddm.expert.evaluate import evaluate
    from ddm.expert.load import load_denoiser

    base = context["sample_cfg"]
    rows: list[dict[str, Any]] = []

    def run(denoiser: Any, kind: str, steps: int, router_calls: int) -> None:
        sample_cfg = base.model_copy(update={"steps": steps, "guidance": guidance})
        name = f"{kind}-{steps}"
        result = evaluate(
            denoiser, **{**context, "sample_cfg": sample_cfg}, out_dir=storage.join(out_dir, name)
        )
        label = "guided top-1 ensemble" if kind == "ensemble" else "student"
        rows.append(row_summary(label, kind, steps, result, router_calls=router_calls))
        r = rows[-1]
        say(
            f"[distill] {label}, {steps} steps: FD {r['fd']:.2f}  KID {r['kid']:.4f}  P {r['precision']:.3f}  "
            f"R {r['recall']:.3f}  acc {r['class_accuracy']}  {r['expert_calls_per_sample']:g} calls/sample  "
            f"{1000 * r['seconds_per_sample']:.2f} ms/sample"
        )

    if router_url is not None and ensemble_steps:
        from ddm.router.ensemble import Ensemble
        from ddm.router.model import load_router

        router = load_router(router_url, device=placement.device)
        placement.announce(f"distill table: router net ({router_url})")
        for steps in ensemble_steps:
            run(Ensemble(experts, router, strategy="top-k", top_k=1), "ensemble", steps, steps)
    student = load_denoiser(student_url, device=placement.device)
    placement.announce(f"distill table: student ({student_url})")
    for steps in student_steps:
        run(student.with_counter(), "student", steps, 0)
    table = {
        "rows": rows,
        **ratios(rows),
        "guidance": guidance,
        "sampler": base.sampler,
        "student": student_url,
        "router": router_url,
    }
    storage.write_json(storage.join(out_dir, TABLE_JSON), table)
    storage.write_bytes(storage.join(out_dir, TABLE_MD), markdown_table(rows).encode())
    return table


def distill_job_spec(ctx: Any, router_url: str | None) -> Any:
    """The student's JobSpec on its island (``ctx``: the run's Pipeline; ``router_url``: the teacher's
    router checkpoint, or None when the run has no router)."""
    from ddm.coordinator import components
    from ddm.coordinator.layout import trained_to
    from ddm.coordinator.stages import serving_expert_dirs

    cfg = ctx.cfg
    dc = cfg.distill
    if dc.teacher.kind == "ensemble" and router_url is None:
        raise ValueError(
            "distill.teacher.kind = 'ensemble' needs the router; enable router or use 'partition'"
        )
    island = dc.island or ctx.islands.default
    if island not in ctx.islands.island:
        raise ValueError(f"distill.island {island!r} is not defined in the islands file")
    dirs = list(serving_expert_dirs(ctx).values())
    output = distill_output(cfg.root)
    return ctx.job("distill", distill_job(cfg, dirs, router_url), output, island, components.trainer,
                   lambda: trained_to(output, dc.train.steps))  # fmt: skip


def run_distill_stage(pipeline: Any, jobs: list) -> dict[str, Any]:
    """The stage: launch the student's job (``stages.Distill.jobs``; skipped when already trained), then
    the table if ``distill.eval``."""
    from ddm.coordinator.eval_stage import eval_context, load_experts
    from ddm.coordinator.stages import router_checkpoint, serving_expert_dirs

    cfg = pipeline.cfg
    dc = cfg.distill
    router_url = router_checkpoint(cfg, pipeline.manifest.data)
    named = serving_expert_dirs(pipeline)
    output = distill_output(cfg.root)
    pipeline.launch(jobs, cfg.experts.max_attempts)
    student_url = student_checkpoint(cfg.root)
    info: dict[str, Any] = {"student": student_url}
    if not dc.eval.enabled:
        return info
    placement = pipeline.where()
    context = eval_context(cfg, progress=pipeline.progress, placement=placement)
    if dc.eval.num_samples is not None:
        context["num_samples"] = dc.eval.num_samples
    table = distill_table(
        experts=load_experts(named, placement, purpose="distill table"),
        router_url=router_url,
        student_url=student_url,
        context=context,
        ensemble_steps=dc.eval.ensemble_steps,
        student_steps=dc.eval.student_steps,
        guidance=dc.eval.guidance if dc.eval.guidance is not None else cfg.eval.sample.guidance,
        out_dir=storage.join(output, "eval"),
        say=pipeline.say,
        placement=placement,
    )
    pipeline.say(f"[distill] {table['fd_ratio_4step']=} {table['time_ratio_4step']=}")
    return {**info, "table": storage.join(output, "eval", TABLE_JSON),
            "fd_ratio_4step": table["fd_ratio_4step"], "time_ratio_4step": table["time_ratio_4step"]}  # fmt: skip
