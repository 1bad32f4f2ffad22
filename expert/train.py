"""Entry point of an expert training job: what TorchX and torchrun run.

    python -m ddm.expert.train --config job.toml [--output URL] [--steps N] [--no-resume]
    torchrun --nproc-per-node 8 -m ddm.expert.train --config job.toml

``add_arguments`` and ``run`` are shared with the ``ddm train-expert`` CLI so both take the same
options. Exit status: 0 done, 1 failed (message on stderr), 2 invalid configuration, 75 stopped by
SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 75  # sysexits.h EX_TEMPFAIL: temporary failure, retry (resume) later


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="expert job config (TOML, local path or s3://)")
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


def load_job(cls: type, args: argparse.Namespace):
    """The job config of ``cls`` from ``args.config``, with ``--output`` and ``--steps`` applied
    (shared by the expert, router and distill entry points); raises ConfigError naming the field."""
    from ddm.core.config import load_config, parse_config

    job = load_config(cls, args.config)
    overrides = {}
    if args.output is not None:
        overrides["output"] = args.output
    if args.steps is not None:
        overrides["train"] = {**job.train.model_dump(), "steps": args.steps}
    if overrides:
        job = parse_config(cls, {**job.model_dump(), **overrides}, f"{args.config} with command-line overrides")
    return job


def run(args: argparse.Namespace) -> int:
    # Imported here so `--help` is instant and config errors are reported before torch loads.
    from ddm.core.config import ConfigError
    from ddm.expert.config import ExpertJobConfig

    try:
        job = load_job(ExpertJobConfig, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    from ddm.expert.trainer import train

    try:
        result = train(job, resume=args.resume, progress=args.progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports
    if result.interrupted:
        if not quiet:
            print(
                f"stopped at step {result.step}; checkpoint {result.checkpoint_url}; rerun to resume",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if not quiet:
        print(
            f"{job.name}: step {result.step}, loss {result.final_loss:.4f}, "
            f"{result.images_seen / max(result.seconds, 1e-9):.1f} img/s, checkpoint {result.checkpoint_url}",
            file=sys.stderr,
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddm.expert.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
