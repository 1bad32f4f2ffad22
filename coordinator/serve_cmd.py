"""``ddm serve``: run an expert server or the router server until SIGTERM/SIGINT, then stop gracefully.

    ddm serve expert --checkpoint runs/demo/experts/expert-0/checkpoints --port 50051
    ddm serve router --run runs/demo --expert host0:50051 --expert host1:50051 ... --port 50050
    ddm serve run runs/demo      # the whole stack on this machine: K expert processes + the router
    ddm serve run runs/demo --expert-ports 50061   # experts on fixed ports 50061, 50062, ...
    ddm serve replace expert-1 --checkpoint runs/demo/experts/expert-1/checkpoints  # no downtime

``serve run`` supervises its expert processes: one that exits is logged, reported in the router's
health and Info, and restarted on the same port with backoff (``coordinator.stack``).

Each prints one line ``ddm serve <kind>: serving ... on HOST:PORT`` once ready (with ``--port 0`` the
port the system picked), which scripts and tests wait for. Bearer tokens are read from a file (or the
environment), never from the command line, where ``ps`` would show them. ``--device`` (default ``auto``:
CUDA when present) places every network the command serves; ``serve run`` passes it on to its expert
server processes. Each process logs the device of each network it loaded (``ddm: ... on ...``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ddm.core.cli import add_options
from ddm.core.device import add_argument as add_device_argument
from ddm.router.config import SampleDefaults

# SampleDefaults fields offered as options
DEFAULTS = ("strategy", "top_k", "guidance_mode", "route_every", "steps", "guidance", "time_grid", "max_n")


def _add_common(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument(
        "--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0; 127.0.0.1 for local only)"
    )
    p.add_argument(
        "--port", type=int, default=default_port, help=f"port (default {default_port}; 0 = pick a free one)"
    )
    p.add_argument("--tls-cert", help="PEM server certificate (enables TLS; needs --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA of client certificates: require mutual TLS")
    p.add_argument(
        "--token-file",
        help="file holding the bearer token clients must send (else $DDM_TOKEN; none: no auth)",
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP on this port")
    p.add_argument(
        "--threads", type=int, help="torch intra-op threads of this process (default: torch's choice)"
    )
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds running calls get to finish on shutdown"
    )
    add_device_argument(p)


def _add_sampling_defaults(p: argparse.ArgumentParser) -> None:
    """The router's defaults for what a Sample request leaves unset, and its concurrency."""
    p.add_argument("--max-concurrent", type=int, default=64, help="Sample calls served at once (default 64)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="Sample calls waiting for a slot; beyond that RESOURCE_EXHAUSTED at once (default 64)",
    )
    add_options(p, SampleDefaults, DEFAULTS, help={
        name: f"what a request that leaves it unset gets: {SampleDefaults.model_fields[name].description}"
        for name in DEFAULTS if name != "max_n"
    })  # fmt: skip
    p.add_argument(
        "--cohort-ms",
        type=float,
        default=5.0,
        help="how long a request waits for others with its schedule to sample with (default 5; 0 = never)",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    e = sub.add_parser("expert", help="serve one expert checkpoint (ddm.v1.Expert, dynamic batching)")
    e.add_argument("--checkpoint", required=True, help="expert checkpoint file or directory (local or s3://)")
    e.add_argument("--max-batch", type=int, default=64, help="most rows in one forward pass (default 64)")
    e.add_argument(
        "--max-delay-ms", type=float, default=2.0, help="longest wait to fill a batch, ms (default 2)"
    )
    e.add_argument(
        "--max-queue", type=int, default=128, help="pending requests before RESOURCE_EXHAUSTED (default 128)"
    )
    e.add_argument("--name", help="expert name reported by Info (default: from the checkpoint)")
    e.add_argument(
        "--expert-index", type=int, help="expert index reported by Info (default: from the name expert-K)"
    )
    e.add_argument("--no-ema", action="store_true", help="serve the raw weights instead of the EMA weights")
    _add_common(e, 50051)
    r = sub.add_parser("router", help="serve the router + ensemble of remote experts (ddm.v1.Router)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--router-checkpoint", help="router checkpoint file or directory")
    src.add_argument("--run", help="run root: use ROOT/router/checkpoints")
    r.add_argument(
        "--expert",
        action="append",
        required=True,
        metavar="ADDR",
        help="expert server host:port, once per expert, in expert order (expert-0 first)",
    )
    _add_sampling_defaults(r)
    r.add_argument(
        "--expert-timeout", type=float, default=60.0, help="deadline of one expert call, s (default 60)"
    )
    r.add_argument(
        "--connect-timeout", type=float, default=120.0, help="wait for experts at start, s (default 120)"
    )
    r.add_argument(
        "--expert-tls-ca", help="PEM CA of the expert servers' certificates (enables TLS to experts)"
    )
    r.add_argument("--expert-tls-cert", help="PEM client certificate for mutual TLS to experts")
    r.add_argument("--expert-tls-key", help="PEM key of --expert-tls-cert")
    r.add_argument(
        "--expert-server-name", help="name to verify in the experts' certificates (default: their host)"
    )
    r.add_argument(
        "--expert-token-file",
        help="bearer token for the experts (else $DDM_EXPERT_TOKEN, else the router's token)",
    )
    r.add_argument(
        "--student",
        metavar="CKPT",
        help="also serve this distilled student (SampleRequest.model = 'student'); default with --run: "
        "ROOT/distill/checkpoints when the run has one",
    )
    _add_common(r, 50050)
    s = sub.add_parser(
        "run", help="serve a finished run on this machine: one expert server process per expert + the router"
    )
    s.add_argument("root", help="run root of a finished experts-mode run (local or s3://)")
    s.add_argument(
        "--expert-threads",
        type=int,
        default=1,
        help="torch threads of each expert server process (default 1)",
    )
    s.add_argument(
        "--expert-ports",
        metavar="PORTS",
        help="ports of the expert servers on 127.0.0.1: P1,P2,... in expert order, or one base port P for "
        "P, P+1, ... (default: free ones picked at start); a restarted expert always gets its port back",
    )
    _add_sampling_defaults(s)
    _add_common(s, 50050)
    x = sub.add_parser(
        "replace",
        help="switch one expert of a live router to a new checkpoint or server, without downtime",
        description="Router.ReplaceExpert: the router connects to the new expert server, switches to it between "
        "sampler steps and lets the old one drain. With --checkpoint the router's `ddm serve run` starts the "
        "new server and stops the old one; with --address the new server is already running (ddm serve expert) "
        "and stopping the old one is yours. Prints the previous and the current expert (step, checkpoint) as JSON.",
    )
    x.add_argument("expert", help="the expert to replace, by name (expert-1)")
    new = x.add_mutually_exclusive_group(required=True)
    new.add_argument("--checkpoint", help="the new checkpoint file or directory (needs `ddm serve run`)")
    new.add_argument("--address", help="host:port of a running expert server to switch to")
    x.add_argument(
        "--router", default="127.0.0.1:50050", help="the router's host:port (default 127.0.0.1:50050)"
    )
    x.add_argument(
        "--connect-timeout",
        type=float,
        default=0.0,
        help="wait for the new server, s (0 = the router's default)",
    )
    x.add_argument(
        "--drain-timeout",
        type=float,
        default=0.0,
        help="wait for the old server's steps in flight, s (0 = 60)",
    )
    x.add_argument("--token-file", help="file holding the router's bearer token (else $DDM_TOKEN)")
    x.add_argument("--tls-ca", help="PEM CA of the router's certificate (enables TLS)")
    x.add_argument("--tls-cert", help="PEM client certificate for mutual TLS")
    x.add_argument("--tls-key", help="PEM key of --tls-cert")
    x.add_argument("--server-name", help="name to verify in the router's certificate (default: its host)")


def _server_tls(args: argparse.Namespace):
    from ddm.proto.rpc import ServerTLS

    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return ServerTLS(args.tls_cert, args.tls_key, args.tls_client_ca)


def _placement(args: argparse.Namespace):
    """The process's device, resolved once (a DeviceError naming --device when it cannot be honoured)."""
    from ddm.core.placement import Placement

    return Placement.resolve(args.device, field="--device")


def _build_expert(args: argparse.Namespace, address: str, token: str | None):
    from ddm.expert.server import ExpertServer

    return ExpertServer(
        args.checkpoint,
        address=address,
        max_batch=args.max_batch,
        max_delay=args.max_delay_ms / 1000,
        max_queue=args.max_queue,
        num_threads=args.threads,
        tls=_server_tls(args),
        token=token,
        metrics_port=args.metrics_port,
        name=args.name,
        expert_index=args.expert_index,
        ema=not args.no_ema,
        device=_placement(args),
    )


def _build_router(args: argparse.Namespace, address: str, token: str | None):
    import os

    import torch

    from ddm.proto.rpc import ClientTLS, read_token
    from ddm.router.server import RouterServer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.router_checkpoint:
        checkpoint = args.router_checkpoint
    else:
        from ddm.coordinator.stack import run_router

        checkpoint = run_router(args.run)  # the run's router now (after add-expert / retire-expert)
    expert_tls = None
    if args.expert_tls_ca or args.expert_tls_cert or args.expert_tls_key:
        expert_tls = ClientTLS(
            args.expert_tls_ca, args.expert_tls_cert, args.expert_tls_key, args.expert_server_name
        )
    expert_token = (
        read_token(args.expert_token_file, env="DDM_EXPERT_TOKEN") if args.expert_token_file else None
    )
    expert_token = expert_token or os.environ.get("DDM_EXPERT_TOKEN") or token
    return RouterServer(
        checkpoint,
        args.expert,
        address=address,
        token=token,
        expert_tls=expert_tls,
        expert_token=expert_token,
        expert_timeout=args.expert_timeout,
        connect_timeout=args.connect_timeout,
        device=_placement(args),
        **_router_options(args),
    )


def _router_options(args: argparse.Namespace) -> dict:
    """RouterServer keyword arguments shared by ``serve router`` and ``serve run``."""
    from ddm.core.cli import config_from_args

    defaults = config_from_args(SampleDefaults, args, DEFAULTS)
    return dict(
        tls=_server_tls(args),
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        defaults=defaults,
        metrics_port=args.metrics_port,
        cohort_delay=args.cohort_ms / 1000,
        student=_student(args),
    )


def _student(args: argparse.Namespace) -> str | None:
    """The student to serve: ``--student``, else the run root's distilled student if it has one."""
    from ddm.core import checkpoint, storage

    if getattr(args, "student", None):
        return args.student
    root = getattr(args, "run", None) or getattr(args, "root", None)
    if not root:
        return None
    from ddm.coordinator.manifest import Manifest

    stored = storage.join(root, "manifest.json")
    if storage.exists(stored) and Manifest.load(root).data.get("lineage", {}).get("student", {}).get("stale"):
        return None  # distilled from experts the run no longer serves (ddm status says why): not served
    return checkpoint.latest(storage.join(root, "distill", "checkpoints"))


def _serve_stack(args: argparse.Namespace, token: str | None, stop: threading.Event) -> int:
    """``ddm serve run ROOT``: expert server processes + the router, until SIGTERM/SIGINT."""
    import torch

    from ddm.coordinator.stack import LocalStack, parse_ports, run_experts
    from ddm.core.device import DeviceError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.expert_ports:  # a usage error, reported before anything starts
        try:
            args.expert_ports = parse_ports(args.expert_ports, len(run_experts(args.root)))
        except ValueError as e:
            print(f"ddm serve run: {e}", file=sys.stderr)
            return 2
    try:
        stack = LocalStack(
            args.root, host=args.host, port=args.port, expert_threads=args.expert_threads, token=token,
            expert_ports=args.expert_ports, router_options=_router_options(args), device=_placement(args),
        ).start()  # fmt: skip
    except DeviceError as e:  # the setting cannot be honoured here: a usage error, like a bad flag
        print(f"ddm serve run: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, TimeoutError) as e:
        print(f"ddm serve run: {e}", file=sys.stderr)
        return 1
    for e in stack.experts:
        print(f"ddm serve run: {e.name} on {e.address} (pid {e.pid})", file=sys.stderr, flush=True)
    print(f"ddm serve run: serving router over {len(stack.experts)} experts on {stack.address}", flush=True)
    stop.wait()
    print(f"ddm serve run: stopping (grace {args.grace:g} s)", file=sys.stderr, flush=True)
    stack.stop(args.grace)
    return 0


def _replace(args: argparse.Namespace) -> int:
    """``ddm serve replace EXPERT``: one ReplaceExpert call; the outcome as one JSON line."""
    import json

    import grpc
    from google.protobuf.json_format import MessageToDict

    from ddm.proto.rpc import ClientTLS, read_token
    from ddm.router.client import RouterClient

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.server_name)
    try:
        with RouterClient(args.router, tls=tls, token=read_token(args.token_file)) as client:
            reply = client.replace_expert(
                args.expert, address=args.address or "", checkpoint=args.checkpoint or "",
                connect_timeout=args.connect_timeout, drain_timeout=args.drain_timeout,
            )  # fmt: skip
    except ValueError as e:
        print(f"ddm serve replace: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"ddm serve replace: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True)), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from ddm.proto.rpc import read_token

    if args.kind == "replace":
        return _replace(args)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        token = read_token(args.token_file)
        if args.kind == "run":
            return _serve_stack(args, token, stop)
        address = f"{args.host}:{args.port}"
        server = (_build_expert if args.kind == "expert" else _build_router)(args, address, token)
        server.start(wait=False)
    except (ValueError, OSError) as e:
        print(f"ddm serve {args.kind}: {e}", file=sys.stderr)
        return 2
    try:
        while not server.wait_loaded(0.2):  # loading; a signal meanwhile still stops cleanly
            if stop.is_set():
                server.stop(0)
                return 0
        server.wait_ready(0)
    except Exception as e:  # the checkpoint or an expert could not be loaded
        print(f"ddm serve {args.kind}: {e}", file=sys.stderr)
        server.stop(0)
        return 1
    what = server.info.name if args.kind == "expert" else f"router over {len(server.experts)} experts"
    print(f"ddm serve {args.kind}: serving {what} on {args.host}:{server.port}", flush=True)
    stop.wait()
    print(f"ddm serve {args.kind}: stopping (grace {args.grace:g} s)", file=sys.stderr, flush=True)
    server.stop(args.grace)
    return 0
