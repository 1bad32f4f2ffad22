"""``ddm cancel RUN`` and ``ddm logs RUN JOB``: act on a run's jobs through their schedulers."""

from __future__ import annotations

import argparse
import os
import sys


def _islands_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--islands", help="islands TOML (default: the one the run was started with)")


def _runner(manifest, islands_url: str | None):
    """A runner that knows the run's kubernetes islands (their handles name ``kubernetes@ISLAND``)."""
    from ddm.coordinator.islands import load_islands
    from ddm.coordinator.kube import make_runner

    return make_runner(load_islands(islands_url or manifest.data.get("config", {}).get("islands")))


def add_cancel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="run root (local path or s3://...)")
    _islands_arg(p)


def run_cancel(args: argparse.Namespace) -> int:
    from ddm.coordinator.launcher import cancel_jobs
    from ddm.coordinator.layout import job_output
    from ddm.coordinator.manifest import Manifest

    manifest = Manifest.load(args.root)
    outputs = {name: job_output(args.root, name) for name in manifest.data["jobs"]}
    with _runner(manifest, args.islands) as runner:
        names = cancel_jobs(manifest, runner, outputs)
    print(f"cancelled: {', '.join(names)}" if names else "no running jobs")
    return 0


def add_logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="run root (local path or s3://...)")
    p.add_argument("job", help="job name, e.g. expert-0")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines (default: all)")
    p.add_argument("-f", "--follow", action="store_true", help="keep streaming until the job ends")
    _islands_arg(p)


def run_logs(args: argparse.Namespace) -> int:
    from ddm.coordinator.manifest import Manifest

    manifest = Manifest.load(args.root)
    record = manifest.data["jobs"].get(args.job)
    if record is None or not record.get("handle"):
        print(
            f"ddm logs: no job {args.job!r} in {args.root}; jobs: {', '.join(manifest.data['jobs']) or 'none'}",
            file=sys.stderr,
        )
        return 2
    handle = record["handle"]
    # The local scheduler knows only the jobs its own process launched, so from here none: their log
    # files are all there is (and TorchX need not load to find that out). A cluster's API knows its jobs.
    local = handle.split("://", 1)[0].startswith("local")
    lines = [] if local else _scheduler_log_lines(manifest, args, handle)
    if not lines:
        lines = _local_log_lines(args.root, handle)
    if not lines:
        print(f"ddm logs: no logs found for {args.job} ({handle})", file=sys.stderr)
        return 1
    for line in lines[-args.tail :] if args.tail else lines:
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
    return 0


def _scheduler_log_lines(manifest, args: argparse.Namespace, handle: str) -> list[str]:
    """The job's log lines as its scheduler (a cluster's API) reports them; empty if it knows none."""
    lines: list[str] = []
    with _runner(manifest, args.islands) as runner:
        try:
            if runner.status(handle) is not None:
                app = runner.describe(handle)
                run_name = manifest.data.get("config", {}).get("name")
                role = (
                    app.roles[0].name
                    if app and app.roles
                    else (f"{run_name}-{args.job}" if run_name else args.job)
                )
                lines = list(runner.log_lines(handle, role, k=0, should_tail=args.follow))
        except (ValueError, KeyError, RuntimeError):
            lines = []
        except Exception as e:  # a cluster API error (pod gone, API server unreachable)
            print(
                f"ddm logs: cannot read the logs of {args.job} from its cluster: {str(e).splitlines()[0]}",
                file=sys.stderr,
            )
    return lines


def _local_log_lines(root: str, handle: str) -> list[str]:
    from ddm.coordinator.layout import local_log_dir

    app_id = handle.rstrip("/").rsplit("/", 1)[-1]
    base = local_log_dir(root)
    out: list[str] = []
    for dirpath, _, files in sorted(os.walk(base)):
        if app_id in dirpath.split(os.sep):
            for name in ("stderr.log", "stdout.log"):
                if name in files:
                    with open(os.path.join(dirpath, name), errors="replace") as f:
                        out += f.readlines()
    return out
