"""``ddm run [CONFIG]``: the whole pipeline, resumable. Without CONFIG it runs the embedded default."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ddm.core.placement import add_override_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", nargs="?", help="run config TOML (local or s3://); default: the embedded default config"
    )
    p.add_argument(
        "--islands", help="islands TOML mapping experts to compute islands (overrides the config's `islands`)"
    )
    p.add_argument(
        "--root", help="run root (overrides the config's `root`), e.g. runs/try2 or s3://bucket/run"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set experts.train.steps=200 (TOML value syntax; repeatable)",
    )  # fmt: skip
    add_override_argument(p)
    p.add_argument("--stages", help="comma-separated subset of stages to run (default: all, in order)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--serve", nargs="?", const="127.0.0.1:50050", metavar="HOST:PORT",
        help="when the run is done, serve it on this machine (expert server processes + the router; "
        "default 127.0.0.1:50050) until Ctrl-C, as `ddm serve run ROOT` does",
    )  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true",
        help="print every job the run would submit, rendered (the Volcano Job YAML for kubernetes islands, the "
        "command line for local ones), and exit; needs no cluster and writes nothing",
    )  # fmt: skip


def parse_overrides(items: list[str]) -> dict:
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. experts.train.steps=200")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare string
    return out


def run(args: argparse.Namespace) -> int:
    from ddm.coordinator.config import load_run_config
    from ddm.coordinator.islands import load_islands
    from ddm.coordinator.manifest import Manifest, ManifestError
    from ddm.coordinator.pipeline import STAGES, Pipeline, RunFailed
    from ddm.coordinator.status_cmd import print_status

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # six lines of which-CPU-build-loaded
    try:
        serve_at = parse_address(args.serve) if args.serve else None
        overrides = parse_overrides(args.set)
    except ValueError as e:
        print(f"ddm run: {e}", file=sys.stderr)
        return 2
    if args.root:
        overrides["root"] = args.root
    if args.islands:
        overrides["islands"] = args.islands
    if args.device:
        overrides["device"] = args.device
    cfg = load_run_config(args.config, overrides)
    from ddm.core import storage

    # For this process and every job it launches; `ddm --s3-endpoint-url` wins over the config.
    storage.configure(endpoint_url=getattr(args, "s3_endpoint_url", None) or cfg.storage.endpoint_url)
    if "://" not in cfg.root:
        cfg = cfg.model_copy(update={"root": os.path.abspath(cfg.root)})
    from ddm.coordinator.data_shape import resolve_run_config
    from ddm.expert.data import DataError, build_dataset

    try:  # shape and classes from the data, before anything is written (a wrong path locks nothing)
        data = build_dataset(cfg.data)
        cfg = resolve_run_config(cfg, data)
    except DataError as e:
        print(f"ddm run: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.model_dump_json(indent=2))
        return 0
    islands = load_islands(cfg.islands)
    stages = STAGES
    if args.stages:
        stages = tuple(s.strip() for s in args.stages.split(","))
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            print(f"ddm run: --stages {unknown}: unknown; stages are {', '.join(STAGES)}", file=sys.stderr)
            return 2
    if args.dry_run:
        from ddm.coordinator.dryrun import format_stream, render_run

        try:
            jobs = render_run(Pipeline(cfg, islands, None, dry_run=True, _data=data))  # type: ignore[arg-type]
        except ValueError as e:
            print(f"ddm run: {e}", file=sys.stderr)
            return 2
        from ddm.coordinator.budget import estimate, format_table

        sys.stdout.write(
            "# what each stage will cost:\n"
            + "".join(f"# {line}\n" for line in format_table(estimate(cfg)).splitlines())
        )
        sys.stdout.write(format_stream(jobs))
        return 0
    from ddm.core.placement import Placement

    placement = Placement.resolve(cfg.device)  # before anything is written: a DeviceError names `device`
    try:
        manifest = Manifest.open(cfg.root, cfg.model_dump(mode="json"))
    except ManifestError as e:
        print(f"ddm run: {e}", file=sys.stderr)
        return 2
    if manifest.config_changes:
        print(f"ddm run: {cfg.root} takes the changed config (nothing was made under the old one):\n  "
              + "\n  ".join(manifest.config_changes), file=sys.stderr)  # fmt: skip
    print(f"ddm run: {cfg.name} at {cfg.root} ({cfg.mode}, {len(islands.island)} island(s))", file=sys.stderr)
    from ddm.coordinator.budget import estimate, format_table

    print(f"ddm run: what each stage will cost:\n{format_table(estimate(cfg))}", file=sys.stderr)
    from torchx.schedulers.local_scheduler import SignalException

    try:
        Pipeline(cfg, islands, manifest, progress=not args.quiet, placement=placement, _data=data).run(stages)
    except (SignalException, KeyboardInterrupt):
        # Local jobs were stopped with SIGTERM and checkpointed; the manifest knows where we were.
        print(f"ddm run: interrupted; run the same command again to carry on ({cfg.root})", file=sys.stderr)
        return 130
    except RunFailed as e:
        print_status(cfg.root)
        _report(cfg.root)
        print(f"ddm run: {e}", file=sys.stderr)
        return 1
    except ManifestError as e:  # another coordinator wrote the manifest: stop, overwrite nothing
        print(f"ddm run: {e}", file=sys.stderr)
        return 1
    print_status(cfg.root)
    _report(cfg.root)
    if serve_at:
        from ddm.coordinator.cli import main  # `ddm serve run ROOT` with the router's defaults

        return main(
            ["serve", "run", cfg.root, "--host", serve_at[0], "--port", serve_at[1], "--device", cfg.device]
        )
    return 0


def _report(root: str) -> None:
    """Write the run's HTML report (``ddm report``) and say where; a report that cannot be written is a
    warning, never the run's failure."""
    from ddm.coordinator.report import write_report

    try:
        print(f"ddm run: report {write_report(root)}", file=sys.stderr)
    except OSError as e:
        print(
            f"ddm run: the report could not be written ({e}); `ddm report {root}` tries again",
            file=sys.stderr,
        )


def parse_address(address: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--serve {address!r}: expected HOST:PORT, e.g. 127.0.0.1:50050")
    return host, port
