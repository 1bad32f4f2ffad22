"""gRPC plumbing shared by the expert server, the router server and the clients.

One place decides channel and server options (message limits, keepalive, load balancing), TLS, bearer
token auth, health and reflection, so every ddm endpoint behaves the same way:

* Message limits are computed from what an endpoint really sends (rows x bytes per row, with
  headroom), not left at gRPC's 4 MiB default, which silently caps batch size.
* Clients use the ``round_robin`` policy: behind a Kubernetes *headless* Service the DNS name
  resolves to every replica and calls spread over them (a ClusterIP would pin one HTTP/2 connection).
* Keepalive pings find dead connections (a killed pod) in seconds instead of at the TCP timeout; the
  servers permit those pings so they never answer with GOAWAY "too_many_pings".
* Auth: ``authorization: Bearer <token>`` metadata, checked in constant time by a server interceptor.
  The health service stays open (Kubernetes probes send no metadata). Tokens are never logged.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)
TOKEN_ENV = "DDM_TOKEN"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------------
# message sizes and options


def message_limit(max_rows: int, row_bytes: int, *, headroom: float = 1.25, floor: int = 4 * MiB) -> int:
    """Bytes a message may take: ``max_rows * row_bytes`` plus 25 % (protobuf framing, other fields),
    never below gRPC's usual 4 MiB so small models keep the familiar limit."""
    if max_rows < 1 or row_bytes < 1:
        raise ValueError(f"max_rows and row_bytes must be >= 1, got {max_rows}, {row_bytes}")
    return min(2**31 - 1, max(floor, int(max_rows * row_bytes * headroom) + 64 * 1024))  # gRPC takes an int32


def server_options(max_message: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),  # two servers must never silently share a port
    ]


def channel_options(max_message: int, *, round_robin: bool = True) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # a lost server is retried quickly once it is back (default backoff grows to 120 s)
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]
    if round_robin:
        options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})))
    return options


# ---------------------------------------------------------------------------------------------------
# TLS


def _read(value: str | Path | bytes | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {value} ({e.strerror})") from None


@dataclass(frozen=True)
class ServerTLS:
    """Server certificate and key (PEM paths or bytes); ``client_ca`` turns on mutual TLS."""

    cert: str | Path | bytes
    key: str | Path | bytes
    client_ca: str | Path | bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        cert, key = _read(self.cert, "TLS certificate"), _read(self.key, "TLS key")
        ca = _read(self.client_ca, "TLS client CA")
        assert cert is not None and key is not None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


@dataclass(frozen=True)
class ClientTLS:
    """``ca``: the CA that signed the server (None: system roots); ``cert``/``key`` for mutual TLS;
    ``server_name`` overrides the name checked in the server certificate."""

    ca: str | Path | bytes | None = None
    cert: str | Path | bytes | None = None
    key: str | Path | bytes | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key (got only one)")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA"),
            private_key=_read(self.key, "TLS client key"),
            certificate_chain=_read(self.cert, "TLS client certificate"),
        )


def make_channel(
    address: str, *, tls: ClientTLS | None = None, max_message: int = 64 * MiB, round_robin: bool = True
) -> grpc.Channel:
    """A channel to ``host:port`` (or ``dns:///name:port``) with ddm's options."""
    if not address or ":" not in address:
        raise ValueError(f"address {address!r} must look like host:port (e.g. 127.0.0.1:50051)")
    options = channel_options(max_message, round_robin=round_robin)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(address, tls.credentials(), options=options)


def bind(server: grpc.Server, address: str, tls: ServerTLS | None = None) -> int:
    """Listen on ``address`` (``host:0`` picks a free port); returns the port. Fails loudly if taken."""
    try:
        port = (
            server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
        )
    except RuntimeError as e:  # grpc raises RuntimeError when it cannot bind
        raise OSError(f"cannot listen on {address}: {e}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address} (in use or not a local address)")
    return port


def dial_target(listen_address: str, port: int | None) -> str:
    """The ``host:port`` a local client dials for a server listening on ``listen_address`` (a wildcard
    host becomes 127.0.0.1; the port is the bound one, which differs when port 0 was asked for)."""
    host = listen_address.rsplit(":", 1)[0]
    return f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{port}"


# ---------------------------------------------------------------------------------------------------
# bearer tokens


def read_token(token_file: str | Path | None = None, *, env: str = TOKEN_ENV) -> str | None:
    """The token from ``token_file`` (stripped) or else the environment variable; None if neither."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"--token-file: cannot read {token_file} ({e.strerror})") from None
        if not token:
            raise ValueError(f"--token-file: {token_file} is empty")
        return token
    return os.environ.get(env) or None


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token (works on plain and TLS channels alike)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED."""

    def abort(_request: object, context: grpc.ServicerContext) -> None:
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization metadata)"
        )

    kwargs = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call without ``authorization: Bearer <token>``, except the health service."""

    def __init__(self, token: str, *, open_prefixes: Sequence[str] = (HEALTH_PREFIX,)):
        if not token:
            raise ValueError("token must be a non-empty string")
        self._expected = f"Bearer {token}".encode()
        self._open = tuple(open_prefixes)

    def __repr__(self) -> str:  # never show the token
        return "TokenAuthInterceptor(<redacted>)"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return handler
        return _deny(handler)


# ---------------------------------------------------------------------------------------------------
# health and reflection


class HealthServicer(health.HealthServicer):
    """grpcio-health-checking's servicer plus ``List`` (every service's status at once), which its
    1.85 release leaves to the base class: UNIMPLEMENTED, with a NotImplementedError traceback logged."""

    def List(
        self, request: health_pb2.HealthListRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthListResponse:
        with self._lock:
            statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()
            }
        )


def add_health_and_reflection(server: grpc.Server, services: Iterable[str]) -> HealthServicer:
    """Register grpc.health.v1 (every service NOT_SERVING until :func:`set_serving`) and reflection."""
    names = list(services)
    servicer = HealthServicer()
    for name in ["", *names]:
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


def set_serving(servicer: HealthServicer, services: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *services]:
        servicer.set(name, status)


def check_health(channel: grpc.Channel, service: str = "", *, timeout: float = 1.0) -> tuple[bool, str]:
    """(healthy, why not) from grpc.health.v1 Check with a short deadline."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    except grpc.RpcError as e:
        return False, f"{e.code().name}: {e.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return False, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return True, ""


def list_health(channel: grpc.Channel, *, timeout: float = 1.0) -> dict[str, str]:
    """Every service's status by name (``SERVING``, ``NOT_SERVING``) from grpc.health.v1 List."""
    reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=timeout)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name
    return {service: name(r.status) for service, r in sorted(reply.statuses.items())}


def remaining_time(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the call's deadline; None when the client set none (gRPC then reports a
    practically infinite time, which would overflow a thread wait)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e8 else max(0.0, remaining)


# ---------------------------------------------------------------------------------------------------
# the servers' common life cycle


class LoadingServer:
    """Base of ddm's gRPC servers: the port opens at once (health NOT_SERVING, calls UNAVAILABLE), then
    the subclass's ``_load()`` runs in the background; SERVING once it returns, ``load_error`` if it
    raised. So an orchestrator can tell "starting" from "gone", and a slow checkpoint read (object
    storage) never looks like a dead pod."""

    SERVICE = ""  # the gRPC service name, e.g. "ddm.v1.Expert"

    def __init__(self, address: str, *, tls: ServerTLS | None, token: str | None):
        self.address, self.tls, self._token = address, tls, token
        self.port: int | None = None
        self.load_error: BaseException | None = None
        self._loaded = threading.Event()  # loading ended, successfully or not
        self._ready = threading.Event()
        self._server: grpc.Server | None = None
        self._health: HealthServicer | None = None
        self._http: tuple | None = None  # a Prometheus HTTP server, if a subclass starts one

    def _load(self) -> None:
        raise NotImplementedError

    def _serve(
        self,
        add_servicer: Callable[[grpc.Server], None],
        *,
        workers: int,
        max_message: int,
        wait: bool,
        timeout: float | None,
    ) -> None:
        """Open the port with ``workers`` handler threads (also the cap on concurrent calls), load."""
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{self.SERVICE}-rpc"),
            interceptors=[TokenAuthInterceptor(self._token)] if self._token else [],
            options=server_options(max_message),
            maximum_concurrent_rpcs=workers,
        )
        add_servicer(self._server)
        self._health = add_health_and_reflection(self._server, [self.SERVICE])
        self.port = bind(self._server, self.address, self.tls)
        self._server.start()
        threading.Thread(target=self._load_in_background, name=f"{self.SERVICE}-load", daemon=True).start()
        if wait:
            self.wait_ready(timeout)

    def _load_in_background(self) -> None:
        try:
            self._load()
            self._ready.set()
            set_serving(self._health, [self.SERVICE], True)
            log.info("%s serving on port %s", self.SERVICE, self.port)
        except BaseException as e:  # reported by wait_ready() and by UNAVAILABLE answers
            self.load_error = e
            log.error("%s could not start: %s", self.SERVICE, e)
        finally:
            self._loaded.set()

    @property
    def target(self) -> str:
        """``host:port`` clients should dial (the bound port, even when asked for port 0)."""
        return dial_target(self.address, self.port)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """True once loading has ended, successfully or not (then see ``load_error``)."""
        return self._loaded.wait(timeout)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until loaded; raise the load error, or TimeoutError."""
        if not self._loaded.wait(timeout):
            raise TimeoutError(f"{self.SERVICE} server on port {self.port} not ready after {timeout} s")
        if self.load_error is not None:
            raise self.load_error

    def abort_unless_ready(self, context: grpc.ServicerContext, what: str) -> None:
        if not self.ready:
            why = f"failed to start ({self.load_error})" if self.load_error else "still loading"
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{what} is {why}")

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls and let running ones finish within ``grace`` seconds."""
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
        if self._http is not None:
            self._http[0].shutdown()
            self._http = None
