"""The one entry point of every training job (expert, router, student): what TorchX and torchrun run.

    python -m ddm.train --config job.toml [--output URL] [--steps N] [--device D] [--no-resume]
    torchrun --nproc-per-node 8 -m ddm.train --config job.toml     (DDP, or FSDP with train.parallelism)

The job's ``kind`` picks its config and trainer from ``JOBS``. ``ddm train``
is this command. Exit status: 0 done, 1 failed (message on stderr), 2 invalid configuration, 75 stopped
by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 75  # sysexits.h EX_TEMPFAIL: temporary failure, retry (resume) later

# kind -> (job config class, trainer class), as "module:name" so that --help imports neither.
JOBS: dict[str, tuple[str, str]] = {
    "expert": ("ddm.expert.config:ExpertJobConfig", "ddm.expert.trainer:ExpertTrainer"),
    "router": ("ddm.router.config:RouterJobConfig", "ddm.router.trainer:RouterTrainer"),
    "student": ("ddm.router.distill_config:DistillJobConfig", "ddm.router.distill:StudentTrainer"),
}


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ddm.core import device

    parser.add_argument(
        "--config", required=True,
        help=f"job config (TOML, local path or s3://) whose `kind` is one of {', '.join(JOBS)}",
    )  # fmt: skip
    parser.add_argument("--output", default=None, help="override the job's output directory (local or s3://)")
    parser.add_argument(
        "--steps", type=int, default=None, help="override train.steps (e.g. to extend a finished job)"
    )
    device.add_argument(parser, default=None, help=f"{device.DEVICE_HELP} (default: the job's train.device)")
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start from step 0, deleting the output's checkpoints (default: resume from the newest)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar on stderr"
    )


def load_job(args: argparse.Namespace) -> Any:
    """The job config named by ``args.config`` with ``--output``, ``--steps`` and ``--device`` applied;
    raises ConfigError naming the file and the field."""
    from ddm.core.config import ConfigError, load_toml, parse_config

    raw = load_toml(args.config)
    kind = raw.get("kind")
    if kind not in JOBS:
        what = "has no kind" if kind is None else f"kind = {kind!r} is not a job kind"
        raise ConfigError(f"{args.config}: {what}; set kind to one of {', '.join(repr(k) for k in JOBS)}")
    cls = _load(JOBS[kind][0])
    job = parse_config(cls, raw, args.config)
    overrides: dict[str, Any] = {}
    if args.output is not None:
        overrides["output"] = args.output
    train = {}
    if args.steps is not None:
        train["steps"] = args.steps
    if getattr(args, "device", None) is not None:
        train["device"] = args.device
    if train:
        overrides["train"] = {**job.train.model_dump(), **train}
    if overrides:
        job = parse_config(
            cls, {**job.model_dump(), **overrides}, f"{args.config} with command-line overrides"
        )
    return job


def run(args: argparse.Namespace) -> int:
    # Imported here so `--help` is instant and config errors are reported before torch loads.
    from ddm.core.config import ConfigError
    from ddm.core.device import DeviceError

    try:
        job = load_job(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    trainer = _load(JOBS[job.kind][1])(job, resume=args.resume, progress=args.progress)
    try:
        result = trainer.run()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(e, DeviceError) else EXIT_FAILED
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports
    if result.interrupted:
        if not quiet:
            print(
                f"stopped at step {result.step}; checkpoint {result.checkpoint_url}; rerun to resume",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if not quiet:
        print(trainer.summary(result), file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddm.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
