"""``ddm add-expert ROOT --data SOURCE`` and ``ddm retire-expert ROOT expert-N`` (coordinator/lifecycle.py).

    ddm add-expert runs/demo --data image-folder --path new_images/ --island gpu-b
    ddm retire-expert runs/demo expert-2 --purge

Options come from the fields of ``LifecycleConfig`` (and the new data's from ``DataConfig``)."""

from __future__ import annotations

import argparse
import json

from ddm.core.cli import add_options, config_from_args
from ddm.core.placement import add_override_argument

ADD_FIELDS = ("island", "router_steps", "router_from")
RETIRE_FIELDS = ("router_steps", "purge")  # purge is a flag (add_options makes typed values)
DATA_FIELDS = ("path", "split", "limit")


def add_add_arguments(p: argparse.ArgumentParser) -> None:
    from ddm.coordinator.lifecycle import LifecycleConfig
    from ddm.core.cli import field_choices
    from ddm.expert.config import DataConfig

    p.add_argument("root", help="run root whose experts and router are trained (local path or s3://...)")
    source = DataConfig.model_fields["source"]
    p.add_argument("--data", dest="source", required=True, choices=field_choices(source),
                   help=f"the new data: {source.description}; where it is: --path")  # fmt: skip
    add_options(p, DataConfig, DATA_FIELDS)
    add_options(
        p,
        LifecycleConfig,
        ["island"],
        unset=("island",),
        unset_help="default: the islands file's island for its index",
    )
    add_options(
        p,
        LifecycleConfig,
        ["router_steps"],
        unset=("router_steps",),
        unset_help="default: the run's router.train.steps",
    )
    add_options(p, LifecycleConfig, ["router_from"])
    add_override_argument(p)  # where the new data is embedded (the run's encoder)
    p.add_argument("--json", action="store_true", help="print the recorded event (with its compute) as JSON")


def add_retire_arguments(p: argparse.ArgumentParser) -> None:
    from ddm.coordinator.lifecycle import LifecycleConfig

    p.add_argument("root", help="run root (local path or s3://...)")
    p.add_argument("expert", help="the expert to retire, e.g. expert-2")
    add_options(
        p,
        LifecycleConfig,
        ["router_steps"],
        unset=("router_steps",),
        unset_help="default: the run's router.train.steps",
    )
    p.add_argument("--purge", action="store_true", help=LifecycleConfig.model_fields["purge"].description)
    p.add_argument("--json", action="store_true", help="print the recorded event as JSON")


def run_add(args: argparse.Namespace) -> int:
    from ddm.coordinator.lifecycle import LifecycleConfig, LifecycleError, add_expert, main_error
    from ddm.coordinator.pipeline import RunFailed
    from ddm.expert.config import DataConfig

    settings = config_from_args(LifecycleConfig, args, ADD_FIELDS)
    data = config_from_args(DataConfig, args, DATA_FIELDS, source=args.source)
    try:
        event = add_expert(args.root, data, settings, device=args.device)
    except (LifecycleError, RunFailed) as e:
        return main_error("add-expert", e)
    if args.json:
        print(json.dumps(event))
    return 0


def run_retire(args: argparse.Namespace) -> int:
    from ddm.coordinator.lifecycle import LifecycleConfig, LifecycleError, main_error, retire_expert
    from ddm.coordinator.pipeline import RunFailed

    settings = config_from_args(LifecycleConfig, args, RETIRE_FIELDS)
    try:
        event = retire_expert(args.root, args.expert, settings)
    except (LifecycleError, RunFailed) as e:
        return main_error("retire-expert", e)
    if args.json:
        print(json.dumps(event))
    return 0
