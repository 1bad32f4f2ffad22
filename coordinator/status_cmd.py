"""``ddm status RUN``: stages, jobs, islands, cluster sizes and latest checkpoints of a run."""

from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="run root (local path or s3://...)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = time.time() - ts
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def print_status(root: str) -> None:
    from ddm.coordinator.manifest import Manifest
    from ddm.coordinator.pipeline import STAGES, job_output
    from ddm.core import checkpoint, heartbeat, storage

    m = Manifest.load(root)
    cfg = m.data["config"]
    print(f"run {cfg.get('name')} at {root}  (mode {cfg.get('mode')})")
    print(f"{'stage':<12}{'state':<10}{'seconds':>9}  info")
    stages = m.data["stages"]  # stored with sorted keys: show them in pipeline order
    for name, st in sorted(stages.items(), key=lambda kv: STAGES.index(kv[0]) if kv[0] in STAGES else len(STAGES)):
        info = {k: v for k, v in st.items() if k not in ("state", "seconds") and not k.endswith("_at")}
        print(f"{name:<12}{st['state']:<10}{st.get('seconds', ''):>9}  {info if info else ''}")
    sizes_url = storage.join(root, "clusters", "report.json")
    sizes = storage.read_json(sizes_url).get("sizes") if storage.exists(sizes_url) else None
    if m.data["jobs"]:
        print(f"\n{'job':<12}{'state':<11}{'island':<10}{'att':>4}{'size':>8}{'step':>13}  {'heartbeat':<10} latest checkpoint")
    for name, job in m.data["jobs"].items():
        out = job_output(root, name)
        beat = heartbeat.read(out)
        latest = checkpoint.latest(storage.join(out, "checkpoints"))
        k = int(name.rsplit("-", 1)[1]) if name.startswith("expert-") else None
        size = sizes[k] if sizes and k is not None and k < len(sizes) else ""
        step = f"{beat['step']}/{beat['steps']}" if beat else "-"
        print(f"{name:<12}{job['state']:<11}{job.get('island', '-'):<10}{len(job['attempts']):>4}{size:>8}{step:>13}  "
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
