"""``ddm compare RUN``: K experts vs a compute-matched monolith (trained if needed), one table.

ddm compare runs/demo                       # monolith at runs/demo/compare/monolith, every model
ddm compare runs/demo --models top-1,full --num-samples 500
"""

from __future__ import annotations

import argparse
import logging
import sys

from ddm.core.placement import add_override_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ddm.coordinator.config import eval_model_names, eval_models

    p.add_argument("root", help="run root of a finished experts-mode `ddm run` (local or s3://)")
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
    try:
        run_compare(args.root, models=models, monolith_root=args.monolith_root, num_samples=args.num_samples,
                    progress=not args.quiet, device=args.device)  # fmt: skip
    except ValueError as e:
        print(f"ddm compare: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"ddm compare: {e}", file=sys.stderr)
        return 1
    return 0
