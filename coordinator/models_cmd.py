"""``ddm models``: every DiT and router architecture with its parameters, GFLOPs per image and tokens.

Counts come from the configs alone (``ddm.expert.model_cost``, ``ddm.router.model_cost``), no weights
are built. GFLOPs follow DiT's convention, one multiply-add = one FLOP (DiT-XL/2 at the defaults, 32x32x4
latents and 1000 classes: 675M parameters, 118.6 GFLOPs); ``--json`` also gives ``flops`` at two per
multiply-add, the figure MFU is computed from.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--image-size", type=int, default=32, metavar="N",
        help="input side length the networks see: pixels, or latents (default 32: 256 px through an 8x VAE)",
    )  # fmt: skip
    p.add_argument(
        "--channels", type=int, default=4, metavar="C",
        help="input channels (default 4: latent channels of the SD VAE; 1 grayscale, 3 RGB pixels)",
    )  # fmt: skip
    p.add_argument(
        "--num-classes", type=int, default=1000, metavar="N",
        help="class labels; the class table has one more row, the null class (default 1000: ImageNet)",
    )  # fmt: skip
    p.add_argument(
        "--num-experts", type=int, default=8, metavar="K",
        help="router output size: one logit per expert (default 8, as in the paper)",
    )  # fmt: skip
    p.add_argument(
        "--arch", metavar="NAME",
        help="show only this architecture, e.g. DiT-XL/2 or Router-B/2 (default: all of them)",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true",
        help="print a JSON list instead of the table: arch, kind, parameters, gflops, "
        "flops (2 per multiply-add), tokens",
    )  # fmt: skip


def rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per architecture (or ``args.arch``); a shape that does not fit the image gets ``error``."""
    from ddm.expert.model import DIT_ARCHS, dit_config
    from ddm.expert.model_cost import dit_cost
    from ddm.router.model import ROUTER_ARCHS, router_config
    from ddm.router.model_cost import router_cost

    image = {"image_size": args.image_size, "in_channels": args.channels, "num_classes": args.num_classes}
    archs = [*DIT_ARCHS, *ROUTER_ARCHS]
    if args.arch is not None and args.arch not in archs:
        raise ValueError(f"--arch {args.arch!r} is not an architecture; choose one of {', '.join(archs)}")
    out = []
    for arch in archs if args.arch is None else [args.arch]:
        row: dict[str, Any] = {"arch": arch, "kind": "expert" if arch in DIT_ARCHS else "router"}
        try:
            if row["kind"] == "expert":
                cost = dit_cost(dit_config(arch, **image))
            else:
                cost = router_cost(router_config(arch, **image, num_experts=args.num_experts))
        except ValueError as e:  # e.g. patch 8 does not divide 28
            out.append({**row, "error": str(e)})
            continue
        row.update(
            parameters=cost.parameters, gflops=round(cost.gflops, 3), flops=cost.flops, tokens=cost.tokens
        )
        out.append(row)
    return out


def short_count(n: int) -> str:
    """675M, 33M, 3.04B: the way the DiT and DDM papers print parameter counts."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e7:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e6:.2f}M"


def short_gflops(g: float) -> str:
    return f"{g:.1f}" if g >= 100 else f"{g:.2f}" if g >= 1 else f"{g:.3f}"


def print_table(table: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"at {args.image_size}x{args.image_size}x{args.channels}, {args.num_classes} classes (+ null), "
        f"routers over {args.num_experts} experts; GFLOPs = 1e9 multiply-adds per image, forward "
        "(DiT's convention)"
    )
    print(f"{'arch':<14}{'kind':<8}{'tokens':>7}{'parameters':>16}{'params':>8}{'GFLOPs':>10}")
    for r in table:
        if "error" in r:
            print(f"{r['arch']:<14}{r['kind']:<8}  - ({r['error'].split(';')[0]})")
            continue
        print(
            f"{r['arch']:<14}{r['kind']:<8}{r['tokens']:>7}{r['parameters']:>16,}"
            f"{short_count(r['parameters']):>8}{short_gflops(r['gflops']):>10}"
        )


def run(args: argparse.Namespace) -> int:
    for name in ("image_size", "channels", "num_classes", "num_experts"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            print(f"ddm models: {flag} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        table = rows(args)
    except ValueError as e:
        print(f"ddm models: {e}", file=sys.stderr)
        return 2
    if args.arch is not None and "error" in table[0]:
        print(f"ddm models: {table[0]['error']}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(table))
    else:
        print_table(table, args)
    return 0
