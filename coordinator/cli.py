"""The ``ddm`` command line. Each subcommand lives in its own small module; this file only wires them.

Heavy imports (torch, faiss, grpc) happen inside the subcommands so ``ddm --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help[, add_arguments name, run name]). Each module has
# add_arguments(parser) and run(args) -> int unless other function names are given.
COMMANDS: dict[str, tuple[str, ...]] = {
    "run": ("ddm.coordinator.run_cmd", "run the whole pipeline from a run config (resumable)"),
    "status": (
        "ddm.coordinator.status_cmd",
        "show a run's stages, jobs, islands, cluster sizes and checkpoints",
    ),
    "assign": (
        "ddm.coordinator.assign_cmd",
        "place new images in a finished run's clusters (which expert owns them)",
    ),
    "add-expert": (
        "ddm.coordinator.lifecycle_cmd",
        "add an expert for new data to a finished run: train it and the router only",
        "add_add_arguments",
        "run_add",
    ),
    "retire-expert": (
        "ddm.coordinator.lifecycle_cmd",
        "take an expert (and its data) out of a run: retrain the router on the rest",
        "add_retire_arguments",
        "run_retire",
    ),
    "cancel": (
        "ddm.coordinator.jobs_cmd",
        "cancel a run's running jobs",
        "add_cancel_arguments",
        "run_cancel",
    ),
    "logs": (
        "ddm.coordinator.jobs_cmd",
        "print (or follow) the logs of one of a run's jobs",
        "add_logs_arguments",
        "run_logs",
    ),
    "train": (
        "ddm.train",
        "train one job (an expert or the monolith, the router, the student) from its job config",
    ),
    "sample": ("ddm.coordinator.sample_cmd", "sample images from a checkpoint and write a PNG grid"),
    "serve": (
        "ddm.coordinator.serve_cmd",
        "serve an expert checkpoint or the router over gRPC (until SIGTERM)",
    ),
    "eval": ("ddm.coordinator.eval_cmd", "evaluate a checkpoint: FD, KID, precision/recall, class accuracy"),
    "k8s": ("ddm.coordinator.k8s_cmd", "write the per-expert kustomize Component of a k8s/ overlay"),
    "compare": (
        "ddm.coordinator.compare_cmd",
        "K experts vs a compute-matched monolith: train it, score all, one table",
    ),
    "report": (
        "ddm.coordinator.report",
        "write one self-contained HTML page of a run: stages, clusters, curves, samples, tables",
    ),
    "models": (
        "ddm.coordinator.models_cmd",
        "list DiT and router architectures: parameters, GFLOPs per image, tokens",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddm",
        description="Decentralized diffusion models: train isolated experts, route between them, serve and distil.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument(
        "--s3-endpoint-url", metavar="URL",
        help="S3-compatible endpoint for s3:// paths (MinIO, Ceph, ...), for this command and the jobs it starts "
        "(default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL; credentials come from the standard AWS chain)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text, *funcs) in COMMANDS.items():
        add_name, run_name = funcs or ("add_arguments", "run")
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, _run=run_name)
        getattr(importlib.import_module(module), add_name)(p)
    return parser


def _version() -> str:
    from ddm import __version__

    return f"ddm {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    from ddm.coordinator.manifest import ManifestError
    from ddm.core.config import ConfigError
    from ddm.core.device import DeviceError

    if args.s3_endpoint_url:
        from ddm.core import storage

        storage.configure(endpoint_url=args.s3_endpoint_url)
    try:
        return int(getattr(importlib.import_module(args._module), args._run)(args) or 0)
    except ConfigError as e:
        print(f"ddm {args.command}: {e}", file=sys.stderr)
        return 2
    except DeviceError as e:  # e.g. --device cuda on a machine without CUDA: the message says what to set
        print(f"ddm {args.command}: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"ddm {args.command}: {e}", file=sys.stderr)
        return 2
    except ManifestError as e:  # e.g. another process wrote the run's manifest first: nothing was overwritten
        print(f"ddm {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ddm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
