"""``ddm status RUN``: the stage table (state, the stage's own time and its wall span, headline figures),
then jobs, islands, cluster sizes, progress with ETA and latest checkpoints of a run.

Reads only JSON on the run root (manifest, heartbeats, checkpoint pointers): no torch, no grpc.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

# A coordinator rewrites coordinator.json every 10 s while a stage runs; silent for longer than this,
# it is taken for dead (a stage it left running stays "running" in the manifest until the next run).
STALE_CLOCK_SECONDS = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="run root (local path or s3://...)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = time.time() - ts
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def _run_config(config: dict[str, Any]) -> Any:
    """The manifest's config as a RunConfig, for the stages' skip rules; None if this ddm cannot read it."""
    from ddm.coordinator.config import RunConfig

    try:
        return RunConfig.model_validate(config)
    except ValueError:
        return None


def stage_rows(
    manifest: Any, cfg: Any, *, alive_at: float | None = None, now: float | None = None
) -> list[dict[str, Any]]:
    """One row per stage, in pipeline order: name, state, own and wall seconds, attempts, headline.
    ``alive_at``: when the coordinator was last heard from (a running stage's time stops there when
    that is long ago: the coordinator was killed)."""
    from ddm.coordinator.manifest import RUNNING, stage_attempts, stage_times
    from ddm.coordinator.stages import ALL

    now = time.time() if now is None else now
    stages = manifest.data["stages"]
    rows = []
    for stage in ALL:
        st = stages.get(stage.name, {"state": "pending"})
        state = st["state"]
        end = now
        if state == RUNNING and alive_at is not None and now - alive_at > STALE_CLOCK_SECONDS:
            state, end = "stopped", alive_at  # its coordinator is gone; `ddm run` resumes it
        own, wall = stage_times(st, now=end)
        if st.get("skipped"):
            note = f"skipped: {st['skipped']}"
        elif st["state"] == "failed":
            note = (
                "failed: " + (st.get("error") or "").strip().splitlines()[0][:160]
                if st.get("error")
                else "failed"
            )
        elif st["state"] == "pending" and cfg is not None and stage.skipped(cfg):
            note = f"will skip: {stage.skipped(cfg)}"
        else:
            note = stage.headline(st)
        attempts = stage_attempts(st)
        span = None
        if attempts and wall is not None:
            span = (attempts[0]["started_at"], attempts[0]["started_at"] + wall)
        rows.append({"stage": stage.name, "state": state, "seconds": own, "wall_seconds": wall,
                     "attempts": len(attempts), "headline": note, "span": span})  # fmt: skip
    extra = [n for n in stages if n not in {s.name for s in ALL}]  # a stage this ddm no longer has
    rows += [{"stage": n, "state": stages[n]["state"], "seconds": stages[n].get("seconds"), "wall_seconds": None,
              "attempts": 0, "headline": "", "span": None} for n in extra]  # fmt: skip
    return rows


def format_stage_table(rows: list[dict[str, Any]]) -> str:
    from ddm.coordinator.progress import format_seconds

    lines = [f"{'stage':<11}{'state':<9}{'own time':>9}{'wall':>9}{'att':>4}  headline"]
    for r in rows:
        own = format_seconds(r["seconds"]) if r["seconds"] is not None else ""
        wall = format_seconds(r["wall_seconds"]) if r["wall_seconds"] is not None else ""
        att = r["attempts"] or ""
        lines.append(f"{r['stage']:<11}{r['state']:<9}{own:>9}{wall:>9}{att:>4}  {r['headline']}".rstrip())
    timed = [r for r in rows if r["seconds"] is not None]
    if timed:
        spans = [r["span"] for r in rows if r.get("span")]
        wall = format_seconds(max(e for _, e in spans) - min(s for s, _ in spans)) if spans else ""
        lines.append(f"{'total':<20}{format_seconds(sum(r['seconds'] for r in timed)):>9}{wall:>9}")
    return "\n".join(lines)


def _job_eta(job: dict[str, Any], beat: dict[str, Any] | None) -> str:
    """ETA of a running job: its steps left at the rate since its latest attempt was submitted."""
    from ddm.coordinator.progress import eta, format_seconds

    if not beat or beat.get("state") != "running" or not job.get("attempts"):
        return ""
    since = (float(job["attempts"][-1].get("submitted_at") or 0), 0)
    left = eta(int(beat["step"]), int(beat["steps"]), since=since, now=float(beat.get("time", time.time())))
    return f"~{format_seconds(left)}" if left is not None and since[0] else ""


def print_status(root: str) -> None:
    from ddm.coordinator.layout import job_output
    from ddm.coordinator.manifest import Manifest
    from ddm.coordinator.progress import read_clock
    from ddm.core import checkpoint, heartbeat, storage

    m = Manifest.load(root)
    config = m.data["config"]
    clock = read_clock(storage.join(root, "coordinator.json"))
    running = any(st.get("state") == "running" for st in m.data["stages"].values())
    heard = ""
    if running and clock:
        heard = (
            f"; coordinator {clock.get('pid')} on {clock.get('host')} last heard {_age(clock.get('time'))}"
        )
    print(f"run {config.get('name')} at {root}  (mode {config.get('mode')}{heard})")
    rows = stage_rows(m, _run_config(config), alive_at=clock.get("time") if clock else None)
    print(format_stage_table(rows))
    from ddm.coordinator.lineage import status_lines

    generations = status_lines(m.data)
    if generations:
        print("\n" + "\n".join(generations))
    sizes_url = storage.join(root, "clusters", "report.json")
    sizes = storage.read_json(sizes_url).get("sizes") if storage.exists(sizes_url) else None
    if m.data["jobs"]:
        print(
            f"\n{'job':<12}{'state':<11}{'island':<10}{'att':>4}{'size':>8}{'step':>13}{'ETA':>9}  {'heartbeat':<10} latest checkpoint"
        )
    for name, job in m.data["jobs"].items():
        out = job_output(root, name)
        beat = heartbeat.read(out)
        latest = checkpoint.latest(storage.join(out, "checkpoints"))
        k = int(name.rsplit("-", 1)[1]) if name.startswith("expert-") else None
        size = sizes[k] if sizes and k is not None and k < len(sizes) else ""
        step = f"{beat['step']}/{beat['steps']}" if beat else "-"
        left = _job_eta(job, beat) if job["state"] in ("SUBMITTED", "RUNNING") else ""
        print(f"{name:<12}{job['state']:<11}{job.get('island', '-'):<10}{len(job['attempts']):>4}{size:>8}{step:>13}{left:>9}  "
              f"{_age(beat and beat.get('time')):<10} {latest or '-'}")  # fmt: skip
        if job.get("error") and job["state"] == "FAILED":
            print("    " + job["error"].strip().splitlines()[0][:200])


def run(args: argparse.Namespace) -> int:
    if args.json:
        import json

        from ddm.coordinator.manifest import Manifest

        print(json.dumps(Manifest.load(args.root).data, indent=2))
        return 0
    print_status(args.root)
    return 0
