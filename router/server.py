"""The router gRPC server: ``ddm.v1.Router`` runs whole sampling jobs through the ensemble of remote experts.

It holds the router network (loaded locally from its checkpoint) and one :class:`RemoteExpert` per
expert address. ``Sample`` validates the request (INVALID_ARGUMENT naming the field), builds an
:class:`~ddm.router.ensemble.Ensemble` of this request's scoped experts with a shared thread pool (so
the selected experts compute in parallel on their servers) and guidance, runs ``iter_sample`` and
streams one Progress per step, then the images as uint8 with the per-expert call counts.

The client's deadline bounds every expert call; a client that goes away (cancel, disconnect) stops
the sampling at the next step and cancels the expert calls in flight. An expert failing mid-sample
ends the call with UNAVAILABLE naming it (see :meth:`RouterServer._expert_failed`, the hook for
degraded sampling). Health and reflection are served; health is SERVING once the router is loaded and
every expert answered Info.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ddm.expert.batching import DynamicBatcher, Expired, QueueFull
from ddm.expert.images import to_uint8
from ddm.expert.sampling import SAMPLERS, iter_sample
from ddm.proto import rpc
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.proto.ddm.v1 import ddm_pb2_grpc as pb_grpc
from ddm.proto.tensors import to_proto
from ddm.router.ensemble import Ensemble
from ddm.router.model import RouterNet, load_router_checkpoint
from ddm.router.remote import CallScope, Cancelled, ExpertFailure, RemoteExpert
from ddm.router.sample_request import (
    SERVED_STRATEGIES,
    BadRequest,
    SampleDefaults,
    initial_noise,
    parse_request,
)

log = logging.getLogger(__name__)
SERVICE = "ddm.v1.Router"


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.samples = Counter("ddm_router_sample_requests", "Sample calls by status code", ["code"], registry=r)
        self.images = Counter("ddm_router_images", "images sampled", registry=r)
        self.expert_calls = Counter("ddm_router_expert_calls", "velocity calls per expert", ["expert"], registry=r)
        self.expert_rows = Counter("ddm_router_expert_rows", "rows sent per expert", ["expert"], registry=r)
        self.seconds = Histogram("ddm_router_sample_seconds", "Sample wall time", registry=r)
        self.active = Gauge("ddm_router_active_samples", "Sample calls in progress", registry=r)


@dataclass
class RouterStats:
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0  # sampler steps run, over all requests


class RouterServer:
    """Serves the router + remote experts. ``start()`` opens the port, then loads and connects."""

    def __init__(
        self,
        router: str | RouterNet,
        experts: Sequence[str],
        *,
        address: str = "127.0.0.1:0",
        tls: rpc.ServerTLS | None = None,
        token: str | None = None,
        expert_tls: rpc.ClientTLS | None = None,
        expert_token: str | None = None,
        expert_timeout: float = 60.0,
        connect_timeout: float = 60.0,
        max_concurrent: int = 64,
        defaults: SampleDefaults | None = None,
        metrics_port: int | None = None,
    ):
        if not experts:
            raise ValueError("experts: give at least one expert address (host:port)")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.router_source = router
        self.addresses = list(experts)
        self.address = address
        self.tls, self._token = tls, token
        self.expert_tls, self._expert_token = expert_tls, expert_token
        self.expert_timeout, self.connect_timeout = expert_timeout, connect_timeout
        self.max_concurrent = max_concurrent
        self.defaults = defaults or SampleDefaults()
        self.metrics_port = metrics_port
        self.metrics = RouterMetrics()
        self.stats = RouterStats()
        self.router: RouterNet | None = None
        self.checkpoint = router if isinstance(router, str) else ""
        self.experts: list[RemoteExpert] = []
        self.router_batcher: DynamicBatcher | None = None
        self.port: int | None = None
        self.load_error: BaseException | None = None
        self._loaded = threading.Event()
        self._ready = threading.Event()
        # Each request's ensemble submits up to K expert calls at once; they mostly wait on the network.
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrent * len(self.addresses), thread_name_prefix="router-experts"
        )
        self._server: grpc.Server | None = None
        self._health: Any = None
        self._http: Any = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float | None = None) -> RouterServer:
        slots = self.max_concurrent + 8  # + Info/ListExperts/health
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=slots, thread_name_prefix="router-rpc"),
            interceptors=[rpc.TokenAuthInterceptor(self._token)] if self._token else [],
            options=rpc.server_options(self._max_message()),
            maximum_concurrent_rpcs=slots,
        )
        pb_grpc.add_RouterServicer_to_server(_RouterServicer(self), self._server)
        self._health = rpc.add_health_and_reflection(self._server, [SERVICE])
        self.port = rpc.bind(self._server, self.address, self.tls)
        self._server.start()
        if self.metrics_port is not None:
            self._http = start_http_server(self.metrics_port, registry=self.metrics.registry)
        threading.Thread(target=self._load, name="router-load", daemon=True).start()
        if wait:
            self.wait_ready(timeout)
        return self

    def _max_message(self) -> int:
        # The largest reply: max_n images as uint8 plus, with include_float, as fp32 (3 x 256 x 256 max).
        return rpc.message_limit(self.defaults.max_n, 3 * 256 * 256 * 5)

    @property
    def target(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return f"{'127.0.0.1' if host in ('', '0.0.0.0', '[::]') else host}:{self.port}"

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """True once loading has ended, successfully or not (then see ``load_error``)."""
        return self._loaded.wait(timeout)

    def wait_ready(self, timeout: float | None = None) -> None:
        if not self._loaded.wait(timeout):
            raise TimeoutError(f"router not ready after {timeout} s (experts {', '.join(self.addresses)})")
        if self.load_error is not None:
            raise self.load_error

    def stop(self, grace: float | None = 5.0) -> None:
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.router_batcher is not None:
            self.router_batcher.close()
        for expert in self.experts:
            expert.close()
        if self._http is not None:
            self._http[0].shutdown()

    def wait_for_termination(self) -> None:
        assert self._server is not None, "start() first"
        self._server.wait_for_termination()

    def _load(self) -> None:
        try:
            if isinstance(self.router_source, RouterNet):
                self.router = self.router_source.eval()
            else:
                self.router, meta = load_router_checkpoint(self.router_source)
                self.checkpoint = str(meta.get("url", self.router_source))
            # Concurrent requests' router passes share one forward (as the experts' Predicts do): a
            # Router-T forward on 4 rows costs nearly what one on 128 rows does. No added delay: it
            # only gathers what queued while the previous forward ran.
            self.router_batcher = DynamicBatcher(
                self._route, max_batch=max(self.defaults.max_n, 512), max_delay=0.0,
                max_queue=self.max_concurrent + 8, name="router-batcher",
            )
            self.experts = [
                RemoteExpert(
                    a, tls=self.expert_tls, token=self._expert_token, timeout=self.expert_timeout,
                    connect_timeout=None, coalesce=True,
                )
                for a in self.addresses
            ]
            list(self.pool.map(lambda e: e.connect(self.connect_timeout), self.experts))
            self._check_compatible()
            self._ready.set()
            rpc.set_serving(self._health, [SERVICE], True)
            log.info("router serving on port %s with experts %s", self.port, [e.name for e in self.experts])
        except BaseException as e:
            self.load_error = e
            log.error("router could not start: %s", e)
        finally:
            self._loaded.set()

    def _check_compatible(self) -> None:
        cfg = self.router.config
        if cfg.num_experts != len(self.experts):
            raise ValueError(
                f"--expert: {len(self.experts)} expert addresses but the router was trained for {cfg.num_experts}; "
                "give one address per expert, in expert order"
            )
        shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        for k, e in enumerate(self.experts):
            if e.num_classes != cfg.num_classes or e.image_shape != shape:
                raise ValueError(
                    f"expert {e.name} at {e.address}: num_classes {e.num_classes}, images {e.image_shape}, but the router "
                    f"has {cfg.num_classes}, {shape}; the experts and the router must come from one run"
                )
            if e.info.expert_index not in (-1, k):
                raise ValueError(
                    f"--expert #{k} ({e.address}) serves {e.name} (expert index {e.info.expert_index}); "
                    "list the expert addresses in expert order"
                )

    @torch.inference_mode()
    def _route(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.router.probabilities(x_t, t, y)  # (B, K)

    def _routing(self, scope: CallScope):
        """The ensemble's router for one request: p(k | x_t, t, y) through the shared batcher."""

        def probabilities(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            req = self.router_batcher.submit(x_t, t, y, deadline=scope.deadline)
            try:
                return self.router_batcher.wait(req, scope.remaining())
            except Expired:
                raise (Cancelled if scope.cancelled else Expired)("routing stopped: deadline or cancellation") from None

        return probabilities

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.router.config
        return (cfg.in_channels, cfg.image_size, cfg.image_size)

    # -- sampling --------------------------------------------------------------------------------------------

    def sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> Iterator[pb.SampleEvent]:
        try:
            p = parse_request(request, self.defaults, num_classes=self.router.num_classes, num_experts=len(self.experts))
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        start = time.perf_counter()
        remaining = rpc.remaining_time(context)
        scope = CallScope.from_timeout(self.defaults.max_seconds if remaining is None else min(remaining, self.defaults.max_seconds))
        state = {"outcome": "running", "steps": 0}

        def on_rpc_end() -> None:  # runs when the call ends for any reason, also while we sit in a yield
            scope.cancel()  # a client that went away stops the expert calls in flight
            if state["outcome"] == "running":
                self.stats.cancelled += 1
                log.info("Sample cancelled by the client (or its deadline) after %d steps", state["steps"])

        context.add_callback(on_rpc_end)
        ensemble = Ensemble(
            [e.scoped(scope) for e in self.experts], self._routing(scope),
            strategy=p.strategy, top_k=p.top_k, threshold=p.threshold, executor=self.pool,
        )
        noise, gen = initial_noise(p.n, self.image_shape, p.seed)
        self.stats.started += 1
        x = noise
        try:
            steps = iter_sample(
                ensemble.guided(p.guidance), noise, p.labels, steps=p.steps, sampler=p.sampler,
                time_shift=p.time_shift, churn=p.churn, generator=gen,
            )
            for step in steps:
                self.stats.steps += 1
                state["steps"] += 1
                if not context.is_active() or scope.cancelled:
                    return  # the client left between steps; on_rpc_end counts it
                x = step.x
                yield pb.SampleEvent(progress=pb.Progress(step=step.index + 1, total=step.total, t=step.t_next))
        except Cancelled:
            return  # the client left during an expert call
        except ExpertFailure as e:
            state["outcome"] = "failed"
            self.stats.failed += 1
            self._expert_failed(e, context)
        except (Expired, QueueFull) as e:
            state["outcome"] = "failed"
            code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(e, Expired) else grpc.StatusCode.RESOURCE_EXHAUSTED
            context.abort(code, f"router: {e}")
        state["outcome"] = "done"
        self.stats.completed += 1
        counts = ensemble.calls
        result = pb.Result(labels=p.labels.tolist(), seconds=time.perf_counter() - start, seed=p.seed)
        to_proto(to_uint8(x), result.images)
        if request.include_float:
            to_proto(x.float(), result.samples)
        for k, e in enumerate(self.experts):
            result.expert_calls.add(name=e.name, calls=counts.batches[k], rows=counts.rows[k])
            self.metrics.expert_calls.labels(e.name).inc(counts.batches[k])
            self.metrics.expert_rows.labels(e.name).inc(counts.rows[k])
        self.metrics.images.inc(p.n)
        self.metrics.seconds.observe(result.seconds)
        yield pb.SampleEvent(result=result)

    def _expert_failed(self, error: ExpertFailure, context: grpc.ServicerContext) -> NoReturn:
        """An expert call failed mid-sample.

        Hook for degraded sampling (a later issue; ``SampleRequest.allow_degraded``): drop the failed
        expert, renormalise the router's weights over the others and carry on, reporting it in
        ``Result.degraded_experts``. Until then the whole call fails, naming the expert.
        """
        code = error.code
        if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            code = grpc.StatusCode.UNAVAILABLE
        context.abort(code, str(error))

    def list_experts(self) -> pb.ListExpertsResponse:
        def status(e: RemoteExpert) -> pb.ExpertStatus:
            healthy, why = e.health(timeout=1.0)
            return pb.ExpertStatus(name=e.name, address=e.address, healthy=healthy, info=e.info, error=why)

        return pb.ListExpertsResponse(experts=list(self.pool.map(status, self.experts)))

    def info(self) -> pb.RouterInfo:
        d, cfg = self.defaults, self.router.config
        return pb.RouterInfo(
            num_classes=cfg.num_classes, image_shape=list(self.image_shape), num_experts=len(self.experts),
            strategies=list(SERVED_STRATEGIES), samplers=list(SAMPLERS), max_n=d.max_n, max_steps=d.max_steps,
            default_strategy=d.strategy, default_top_k=d.top_k, default_steps=d.steps,
            default_guidance=d.guidance, checkpoint=self.checkpoint, ready=self.ready,
        )


class _RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, server: RouterServer):
        self.s = server

    def _require_ready(self, context: grpc.ServicerContext) -> None:
        if not self.s.ready:
            why = f"failed to start ({self.s.load_error})" if self.s.load_error else "still loading / connecting to experts"
            context.abort(grpc.StatusCode.UNAVAILABLE, f"router is {why}")

    def Sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> Iterator[pb.SampleEvent]:
        self._require_ready(context)
        self.s.metrics.active.inc()
        code = grpc.StatusCode.OK
        try:
            yield from self.s.sample(request, context)
        except Exception:
            code = context.code() or grpc.StatusCode.UNKNOWN  # abort() set it
            raise
        finally:
            self.s.metrics.active.dec()
            self.s.metrics.samples.labels(code.name if isinstance(code, grpc.StatusCode) else str(code)).inc()

    def ListExperts(self, request: pb.ListExpertsRequest, context: grpc.ServicerContext) -> pb.ListExpertsResponse:
        self._require_ready(context)
        return self.s.list_experts()

    def Info(self, request: pb.RouterInfoRequest, context: grpc.ServicerContext) -> pb.RouterInfo:
        self._require_ready(context)
        return self.s.info()
