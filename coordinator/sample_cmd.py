"""``ddm sample``: draw guided samples and write a PNG grid, from a checkpoint locally, from a finished
run's ensemble in this process (``--run ROOT``: its router and every expert loaded here), or through a
router server (``--router HOST:PORT``: the ensemble of remote experts, with a progress bar).
``--run`` starts from the same noise for a seed as the router server does, so it reproduces a served
sample; ``--allow-degraded`` lets the router finish without an expert that went down (listed).

A distilled student's checkpoint samples locally like an expert's; it guides itself (w is its input:
one pass per step) and uses the step count as its shortcut step size. ``--router ... --model student``
asks the router for the student it serves.

Locally the network runs on ``--device`` (default ``auto``: CUDA when present), announced on stderr;
the noise is drawn from ``--seed`` on the CPU and moved there, so a seed gives the same starting noise
on any device. Through a router, the router's and experts' servers place their own networks."""

from __future__ import annotations

import argparse
from typing import Any

from ddm.core.cli import add_options
from ddm.core.device import add_argument as add_device_argument
from ddm.expert.config import SampleConfig
from ddm.router.config import RoutingConfig

SAMPLING = (
    "guidance",
    "steps",
    "sampler",
    "time_grid",
    "time_shift",
)  # SampleConfig fields offered as options
ROUTING = (
    "strategy",
    "top_k",
    "threshold",
    "guidance_mode",
    "route_every",
)  # RoutingConfig fields, through a router only


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", help="checkpoint file or directory (local or s3://); the newest one in a directory"
    )
    src.add_argument(
        "--router", metavar="HOST:PORT", help="sample through a router server (ddm serve router) instead"
    )
    src.add_argument(
        "--run",
        metavar="ROOT",
        help="sample a finished run's ensemble in this process (its router and every expert loaded here)",
    )
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument(
        "--labels",
        default="cycle",
        help="class labels, repeated to fill n: comma-separated class names (the run's, e.g. an image folder's "
        "sub-folders) or numbers, 'cycle' for 0,1,2,... or 'null' for unconditional",
    )
    add_options(p, SampleConfig, SAMPLING)
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", default="samples.png", help="output PNG (local or s3://)")
    p.add_argument("--nrow", type=int, default=0, help="images per grid row (default: about sqrt(n))")
    add_device_argument(p)
    r = p.add_argument_group("through a router (--router); the routing options also for --run")
    add_options(r, RoutingConfig, ROUTING, unset=ROUTING, unset_help="default: the router's")
    r.add_argument(
        "--model",
        choices=["ensemble", "student"],
        help="what the router samples: the ensemble (default) or the distilled student it serves",
    )
    r.add_argument(
        "--timeout", type=float, default=600.0, help="deadline of the whole call, seconds (default 600)"
    )
    r.add_argument("--tls-ca", help="PEM CA of the router's certificate (enables TLS)")
    r.add_argument("--tls-cert", help="PEM client certificate for mutual TLS")
    r.add_argument("--tls-key", help="PEM key of --tls-cert")
    r.add_argument("--server-name", help="name to verify in the router's certificate (default: its host)")
    r.add_argument("--token-file", help="file holding the router's bearer token (else $DDM_TOKEN)")
    r.add_argument(
        "--allow-degraded",
        action="store_true",
        help="let the router finish without an expert that is or goes down (named in the output); "
        "default: such a call fails with UNAVAILABLE",
    )


def parse_labels(spec: str, n: int, num_classes: int, class_names: list[str] | None = None):
    """(n,) int64 labels from ``--labels``: 'cycle', 'null', or comma-separated class numbers and/or class
    names (``class_names``: the checkpoint's, the run's or the router's), repeated to fill ``n``. A bad
    value is a ValueError listing the valid ones."""
    import torch

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if spec == "cycle":
        return torch.arange(n) % max(num_classes, 1)  # unconditional (0 classes): the null label 0
    if spec == "null":
        return torch.full((n,), num_classes, dtype=torch.long)
    names = list(class_names or [])
    by_name = {name: i for i, name in enumerate(names)}
    folded = {name.casefold(): i for i, name in enumerate(names)}
    values, bad = [], []
    for token in (v.strip() for v in spec.split(",")):
        if not token:
            continue
        if token in by_name or token.casefold() in folded:
            values.append(by_name.get(token, folded.get(token.casefold())))
        elif token.lstrip("-").isdigit() and 0 <= int(token) < num_classes:
            values.append(int(token))
        else:
            bad.append(token)
    if bad and not num_classes:
        raise ValueError(
            f"--labels {', '.join(map(repr, bad))}: this checkpoint is unconditional; use --labels cycle or null"
        )
    if bad or not values:
        valid = ", ".join(f"{i} {name}" for i, name in enumerate(names)) if names else f"0..{num_classes - 1}"
        what = (
            f"--labels {', '.join(map(repr, bad))}: not a class of this model" if bad else "--labels is empty"
        )
        raise ValueError(
            f"{what}; the classes are {valid} (names or numbers, comma-separated), or 'cycle' or 'null'"
        )
    return torch.tensor(values)[torch.arange(n) % len(values)]


def run(args: argparse.Namespace) -> int:
    from ddm.core.cli import config_from_args

    config_from_args(SampleConfig, args, SAMPLING)  # bad values: a ConfigError naming the option
    config_from_args(RoutingConfig, args, ROUTING)
    if args.router:
        return run_remote(args)
    import sys

    if args.allow_degraded:
        print("ddm sample: --allow-degraded applies to --router only (in this process no expert can go down)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.run:
        return run_ensemble(args)
    import math

    import torch

    from ddm.core import storage
    from ddm.core.placement import Placement
    from ddm.expert.guidance import with_guidance
    from ddm.expert.images import save_grid, to_uint8
    from ddm.expert.load import load_denoiser, recorded
    from ddm.expert.sampling import sample
    from ddm.expert.student import StudentDenoiser

    if not args.checkpoint.endswith(".safetensors") and storage.exists(
        storage.join(args.checkpoint, "manifest.json")
    ):
        print(f"ddm sample: --checkpoint {args.checkpoint} is a run root; sample its ensemble with --run {args.checkpoint}",
              file=sys.stderr)  # fmt: skip
        return 2
    placement = Placement.resolve(args.device, field="--device")
    denoiser = load_denoiser(args.checkpoint, ema=not args.no_ema, device=placement.device)
    facts = recorded(args.checkpoint)  # its time shift and latent space
    student = isinstance(denoiser, StudentDenoiser)
    placement.announce(f"sample: {'student' if student else 'model'} ({args.checkpoint})")
    try:
        y = placement.to(parse_labels(args.labels, args.n, denoiser.num_classes, denoiser.class_names))
    except ValueError as e:
        print(f"ddm sample: {e}", file=sys.stderr)
        return 2
    shape = denoiser.image_shape
    gen = torch.Generator().manual_seed(args.seed)  # on the CPU: the same noise for a seed on any device
    noise = placement.to(torch.randn(args.n, *shape, generator=gen))
    if args.model == "student" and not student:
        raise ValueError(f"--model student: {args.checkpoint} is not a distilled student checkpoint")
    guided = with_guidance(denoiser, args.guidance)  # CFG pair for an expert, one pass for a student
    x0 = sample(
        guided, noise, y, steps=args.steps, sampler=args.sampler, time_grid=args.time_grid,
        time_shift=facts["time_shift"] if args.time_shift is None else args.time_shift, generator=gen,
    )  # fmt: skip
    x0 = decoded(x0, facts["latent"], placement)
    nrow = args.nrow or max(1, int(math.ceil(math.sqrt(args.n))))
    save_grid(to_uint8(x0).cpu(), args.out, nrow=nrow)
    print(f"wrote {args.n} samples to {args.out}")
    return 0


def run_remote(args: argparse.Namespace) -> int:
    """Sample through the router: labels are resolved with the router's num_classes, a tqdm bar follows
    the streamed progress, and the uint8 images it returns go straight into the grid."""
    import math
    import sys

    import grpc
    from tqdm import tqdm

    from ddm.expert.images import save_grid
    from ddm.proto.rpc import ClientTLS, read_token
    from ddm.router.client import RouterClient

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.server_name)
    if args.device != "auto":
        print(
            "ddm sample: --device applies to --checkpoint only; the router's and experts' servers place "
            "their own networks (`ddm serve ... --device`)",
            file=sys.stderr,
        )
        return 2
    if args.no_ema:
        print(
            "ddm sample: --no-ema applies to --checkpoint only; "
            "`ddm serve expert --no-ema` picks the served weights",
            file=sys.stderr,
        )
        return 2
    with RouterClient(
        args.router, tls=tls, token=read_token(args.token_file), timeout=args.timeout
    ) as client:
        try:
            info = client.info()
            y = parse_labels(args.labels, args.n, info.num_classes, list(info.class_names))
            with tqdm(total=args.steps, desc="sampling", unit="step", file=sys.stderr) as bar:
                images, result = client.sample(
                    args.n,
                    y,
                    guidance=args.guidance,
                    steps=args.steps,
                    sampler=args.sampler,
                    strategy=args.strategy,
                    top_k=args.top_k,
                    threshold=args.threshold,
                    guidance_mode=args.guidance_mode,
                    route_every=args.route_every,
                    seed=args.seed,
                    time_shift=args.time_shift,
                    time_grid=args.time_grid,
                    model=args.model,
                    allow_degraded=args.allow_degraded,
                    on_progress=lambda step, total, t: bar.update(step - bar.n),
                )
        except grpc.RpcError as e:
            print(f"ddm sample: router {args.router}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except ValueError as e:
            print(f"ddm sample: {e}", file=sys.stderr)
            return 2
    nrow = args.nrow or max(1, int(math.ceil(math.sqrt(args.n))))
    save_grid(images, args.out, nrow=nrow)
    calls = ", ".join(f"{name} {count}" for name, count in result.expert_calls.items())
    degraded = f"; degraded, without {', '.join(result.degraded_experts)}" if result.degraded_experts else ""
    print(
        f"wrote {args.n} samples to {args.out} ({result.seconds:.2f} s on the router; expert calls: {calls}{degraded})"
    )
    return 0


def run_class_names(root: str) -> list[str] | None:
    """A run's class names, label i = names[i], as its partition stage recorded them (None: none known)."""
    from ddm.core import storage

    report = storage.join(root, "clusters", "report.json")
    names = storage.read_json(report).get("class_names") if storage.exists(report) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def run_ensemble(args: argparse.Namespace) -> int:
    """``--run ROOT``: the run's router and experts loaded here, sampled as one Ensemble with the router
    server's defaults for what is unset (top-1) and its starting noise for the seed."""
    import math
    import sys

    from ddm.coordinator.stack import run_experts
    from ddm.core import storage
    from ddm.core.placement import Placement
    from ddm.expert.images import save_grid, to_uint8
    from ddm.expert.load import load_denoiser, recorded
    from ddm.expert.sampling import sample
    from ddm.router.ensemble import Ensemble
    from ddm.router.model import load_router
    from ddm.router.sample_request import SampleDefaults, initial_noise

    if args.model == "student":
        print("ddm sample: --model student with --run: sample the student with --checkpoint ROOT/distill/checkpoints",
              file=sys.stderr)  # fmt: skip
        return 2
    d = SampleDefaults()  # what the router server does with these unset
    try:
        placement = Placement.resolve(args.device, field="--device")
        named = run_experts(args.run)
        experts = [load_denoiser(ckpts, ema=not args.no_ema, device=placement.device) for _, ckpts in named]
        router_url = storage.join(args.run, "router", "checkpoints")
        ensemble = Ensemble(
            experts, load_router(router_url, device=placement.device), strategy=args.strategy or d.strategy,
            top_k=d.top_k if args.top_k is None else args.top_k,
            threshold=d.threshold if args.threshold is None else args.threshold,
            guidance_mode=args.guidance_mode or d.guidance_mode,
            route_every=d.route_every if args.route_every is None else args.route_every,
        )  # fmt: skip
        y = placement.to(parse_labels(args.labels, args.n, ensemble.num_classes, run_class_names(args.run)))
    except ValueError as e:
        print(f"ddm sample: {e}", file=sys.stderr)
        return 2
    placement.announce(f"sample: router + {len(experts)} experts ({args.run})")
    noise, gen = initial_noise(args.n, experts[0].image_shape, args.seed)
    facts = recorded(named[0][1])  # the experts' time shift and latent space
    shift = facts["time_shift"] if args.time_shift is None else args.time_shift
    x0 = sample(ensemble.guided(args.guidance), placement.to(noise), y, steps=args.steps, sampler=args.sampler,
                time_grid=args.time_grid, time_shift=shift, generator=gen)  # fmt: skip
    x0 = decoded(x0, facts["latent"], placement)
    nrow = args.nrow or max(1, int(math.ceil(math.sqrt(args.n))))
    save_grid(to_uint8(x0).cpu(), args.out, nrow=nrow)
    rows = ", ".join(f"{name} {r}" for (name, _), r in zip(named, ensemble.calls.rows))
    print(
        f"wrote {args.n} samples to {args.out} (in-process ensemble of {len(experts)} experts; expert rows: {rows})"
    )
    return 0


def decoded(x0: Any, latent: dict | None, placement: Any) -> Any:
    """Samples as pixels: latents (a latent-space model) decoded once by the run's autoencoder."""
    if not latent:
        return x0
    from ddm.expert.autoencoder import codec_from_record

    return codec_from_record(latent, placement.device).decode(x0)
