"""``python -m ddm.proto.probe HOST:PORT``: exit 0 when the server's grpc.health.v1 says SERVING.

For Kubernetes exec probes where the kubelet's native gRPC probe cannot be used: clusters older than
1.24, and servers that speak TLS (native gRPC probes send plaintext and no client certificate). It
imports only grpc and the health stubs, so a probe costs a fraction of a second of CPU.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ddm.proto.probe", description=__doc__.splitlines()[0])
    p.add_argument("address", help="HOST:PORT of the gRPC server, e.g. 127.0.0.1:50051")
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline in seconds (default 2)")
    p.add_argument("--tls-ca", help="PEM CA of the server certificate (enables TLS)")
    p.add_argument("--tls-cert", help="PEM client certificate (servers that require mutual TLS)")
    p.add_argument("--tls-key", help="PEM key of --tls-cert")
    p.add_argument("--server-name", help="name to verify in the server certificate (default: the host)")
    args = p.parse_args(argv)

    from ddm.proto.rpc import ClientTLS, check_health, make_channel

    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = ClientTLS(args.tls_ca, args.tls_cert, args.tls_key, args.server_name)
    try:
        channel = make_channel(args.address, tls=tls, round_robin=False)
    except (ValueError, OSError) as e:
        print(f"probe: {e}", file=sys.stderr)
        return 2
    with channel:
        ok, why = check_health(channel, args.service, timeout=args.timeout)
    if not ok:
        print(f"probe: {args.address} is not serving: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
