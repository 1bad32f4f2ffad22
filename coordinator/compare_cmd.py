"""``ddm compare RUN``: K experts vs a compute-matched monolith (trained if needed), one table.

ddm compare                                 # the headline: configs/headline.toml's run (runs/headline), then compare
ddm compare runs/demo                       # a finished run: monolith at runs/demo/compare/monolith, every model
ddm compare runs/demo --models top-1,full --num-samples 500

A ROOT that holds no run yet is first run with ``--config`` (default: the checkout's
configs/headline.toml, the budget of docs/compare.md's table), as ``ddm run CONFIG --root ROOT`` would.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ddm.core.placement import add_override_argument

HEADLINE = Path(__file__).resolve().parents[1] / "configs" / "headline.toml"  # in a checkout


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ddm.coordinator.config import eval_model_names, eval_models

    p.add_argument(
        "root", nargs="?",
        help="run root of an experts-mode `ddm run` (local or s3://); one with no run yet is run first with "
        "--config (default: that config's root)",
    )  # fmt: skip
    p.add_argument(
        "--config",
        help="run config for a ROOT with no run yet (default: configs/headline.toml, the compute-matched "
        "headline of docs/compare.md)",
    )
    p.add_argument(
        "--models", default=",".join(eval_models()),
        help=f"comma-separated ensembles to score beside the monolith, from {eval_model_names()} "
        f"(default: {','.join(eval_models())})",
    )  # fmt: skip
    p.add_argument(
        "--monolith-root", help="where the matched monolith trains (default: ROOT/compare/monolith)"
    )
    p.add_argument(
        "--num-samples", type=int, help="generated images per model (default: the run's eval.num_samples)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_override_argument(p)


def run(args: argparse.Namespace) -> int:
    from ddm.coordinator.compare import run_compare
    from ddm.coordinator.pipeline import RunFailed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if args.num_samples is not None and args.num_samples < 10:
        print(f"ddm compare: --num-samples must be >= 10, got {args.num_samples}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    root = args.root
    if root is None or not _has_run(root):
        rc, root = _run_first(args)
        if rc:
            return rc
    elif args.config:
        print(f"ddm compare: {root} already holds a run; compared as it is (--config {args.config} is for a new root)",
              file=sys.stderr)  # fmt: skip
    try:
        run_compare(root, models=models, monolith_root=args.monolith_root, num_samples=args.num_samples,
                    progress=not args.quiet, device=args.device)  # fmt: skip
    except ValueError as e:
        print(f"ddm compare: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"ddm compare: {e}", file=sys.stderr)
        return 1
    return 0


def _has_run(root: str) -> bool:
    from ddm.core import storage

    return storage.exists(storage.join(root, "manifest.json"))


def _run_first(args: argparse.Namespace) -> tuple[int, str]:
    """``ddm run CONFIG [--root ROOT]`` for a root with no run yet: (its exit code, the root)."""
    from ddm.coordinator.cli import main
    from ddm.coordinator.config import load_run_config

    config = args.config or str(HEADLINE)
    if args.config is None and not HEADLINE.exists():
        print(f"ddm compare: {args.root or 'no ROOT'}: no run there, and {HEADLINE} is not here (an installed "
              "ddm has no checkout): pass --config CONFIG or the root of a finished run", file=sys.stderr)  # fmt: skip
        return 2, ""
    root = args.root or load_run_config(config).root
    print(f"ddm compare: {root} holds no run: running {config} there first", file=sys.stderr)
    cmd = ["run", config, "--root", root, *(["--quiet"] if args.quiet else [])]
    if args.device:
        cmd += ["--device", args.device]
    return main(cmd), root
