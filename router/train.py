"""Entry point of a router training job: what TorchX runs.

    python -m ddm.router.train --config job.toml [--output URL] [--steps N] [--no-resume]

``add_arguments`` and ``run`` follow ``ddm.expert.train`` (a CLI subcommand can reuse them), with the
same exit status: 0 done, 1 failed (message on stderr), 2 invalid configuration, 75 stopped by
SIGTERM/SIGINT after saving a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ddm.expert.train import EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, load_job

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="router job config (TOML, local path or s3://)")
    parser.add_argument("--output", default=None, help="override the job's output directory (local or s3://)")
    parser.add_argument(
        "--steps", type=int, default=None, help="override train.steps (e.g. to extend a finished job)"
    )
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start from step 0, deleting the output's checkpoints (default: resume from the newest)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar on stderr"
    )


def run(args: argparse.Namespace) -> int:
    # Imported here so `--help` is instant and config errors are reported before torch loads.
    from ddm.core.config import ConfigError
    from ddm.router.config import RouterJobConfig

    try:
        job = load_job(RouterJobConfig, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    from ddm.router.trainer import train

    try:
        result = train(job, resume=args.resume, progress=args.progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if result.interrupted:
        print(
            f"stopped at step {result.step}; checkpoint {result.checkpoint_url}; rerun to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    summary = (
        f"{job.name}: step {result.step}, loss {result.final_loss:.4f}, checkpoint {result.checkpoint_url}"
    )
    if result.accuracy is not None:
        acc = result.accuracy
        summary += (
            f"; held-out accuracy at t ~ {acc['t_mid'][0]:.2f}: {acc['conditional'][0]:.3f} (class), "
            f"{acc['unconditional'][0]:.3f} (null); at t ~ {acc['t_mid'][-1]:.2f}: "
            f"{acc['unconditional'][-1]:.3f} (null; largest share {acc['prior_accuracy']:.3f})"
        )
    print(summary, file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddm.router.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
