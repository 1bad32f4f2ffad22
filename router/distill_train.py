"""Entry point of a distillation job: what TorchX runs.

    python -m ddm.router.distill_train --config job.toml [--output URL] [--steps N] [--no-resume]

Same options and exit status as ``ddm.expert.train`` / ``ddm.router.train``: 0 done, 1 failed (message
on stderr), 2 invalid configuration, 75 stopped by SIGTERM/SIGINT after saving a checkpoint (rerun the
same command to resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ddm.expert.train import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, load_job
from ddm.router.train import add_arguments

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "add_arguments", "main", "run"]


def run(args: argparse.Namespace) -> int:
    # Imported here so `--help` is instant and config errors are reported before torch loads.
    from ddm.core.config import ConfigError
    from ddm.router.distill_config import DistillJobConfig

    try:
        job = load_job(DistillJobConfig, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    from ddm.router.distill import train

    try:
        result = train(job, resume=args.resume, progress=args.progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint_url}; rerun to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{job.name}: step {result.step}, loss {result.final_loss:.4f}, checkpoint {result.checkpoint_url}", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddm.router.distill_train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)  # the router job's options: --config, --output, --steps, --no-resume, --no-progress
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
