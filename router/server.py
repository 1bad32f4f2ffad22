"""The router gRPC server: ``ddm.v1.Router`` runs whole sampling jobs through the ensemble of remote experts.

It holds the router network (loaded locally from its checkpoint) and one :class:`RemoteExpert` per
expert address. ``Sample`` validates the request (INVALID_ARGUMENT naming the field) and joins a
cohort (``router.cohort``: concurrent requests with the same schedule sampled as one batch). A cohort
builds an :class:`~ddm.router.ensemble.Ensemble` of scoped remote experts with a shared thread pool (so
the selected experts compute in parallel on their servers) and guidance, runs ``iter_sample`` and
sends every member one Progress per step, then its own images as uint8 with the expert call counts.

Concurrent work is shared at three levels: requests in a cohort (one sampler step for all), cohorts'
router passes (one batched forward, a :class:`~ddm.expert.batching.DynamicBatcher` with no added
delay), and cohorts' calls to one expert (one Predict, ``RemoteExpert(coalesce=True)``), which the
expert server batches again with other routers' calls. So 32 clients cost the router a few forwards and
Predicts per step, not 32 of each.

The client's deadline bounds every expert call; a client that goes away (cancel, disconnect) stops
the sampling at the next step and stops waiting for (or cancels) its expert calls. An expert failing
mid-sample ends the call with UNAVAILABLE naming it, unless the request allows degraded sampling
(``router.degraded``: drop it, renormalise over the live experts, report it). Health and reflection
are served; health is SERVING once the router is loaded and every expert answered Info.

Once serving, the router watches its experts (a grpc.health.v1 check of each every
``health_interval`` s, and every failed call): an expert found down is logged, its health service
``ddm.v1.Expert/NAME`` on the router turns NOT_SERVING, and so do the router's overall health (``""``)
and ``ddm.v1.Router``, because a request without ``allow_degraded`` may need it (the service
``liveness`` stays SERVING: the router process itself is fine); ``Info.down_experts`` names it and
``Info.ready`` is false. Requests with ``allow_degraded`` skip it. When its check passes
again (a restarted server on the same address: the channel reconnects by itself) it is logged as back
and everything returns to SERVING. Every degraded or expert-failed Sample is logged with the experts
it lost and why.

The router network, the student and the ensemble's math (mixing weights x remote velocities, guidance,
the sampler's state) run on ``device`` (``core.device`` policy), announced once loaded. Initial noise
is drawn from the request's seed on the host (the same images for a seed on any device) and moved
there; tensors cross to the host only at the wire: x_t encoded for each expert call, velocities
decoded back onto the device (``ExpertClient.velocity_of``), images encoded into the Result.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from ddm.core.placement import Placement
from ddm.expert.batching import DynamicBatcher, Expired, QueueFull
from ddm.expert.sampling import iter_sample
from ddm.proto import rpc
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.proto.ddm.v1 import ddm_pb2_grpc as pb_grpc
from ddm.router.admission import Admission, GaveUp, Overloaded
from ddm.router.cohort import CohortScheduler, Member, broadcast, cohort_deadline, member_results, wait_event
from ddm.router.degraded import Degradation
from ddm.router.ensemble import Ensemble
from ddm.router.model import RouterNet, load_router_checkpoint
from ddm.router.remote import CallScope, Cancelled, ExpertFailure, RemoteExpert, check_experts_fit
from ddm.router.replace import ExpertSet, Launcher, ReplaceBusy, ReplaceError, Replacement, replace_expert
from ddm.router.sample_request import (
    BadRequest,
    SampleDefaults,
    initial_noise,
    parse_request,
    router_info,
)

log = logging.getLogger(__name__)
SERVICE = "ddm.v1.Router"
EXPERT_HEALTH_PREFIX = "ddm.v1.Expert/"  # + an expert's name: its health as the router sees it
# SERVING from loaded to shutdown whatever the experts do: what a liveness probe checks (restarting a
# router whose expert is down only loses its other work), where readiness checks "" or ddm.v1.Router.
LIVENESS = "liveness"
# A health check that times out is a strike, not proof: an expert is down after this many in a row (a
# hung process), at once for a refused connection or NOT_SERVING. RESOURCE_EXHAUSTED means busy: up.
DEADLINE_STRIKES = 3


def expert_health_service(name: str) -> str:
    """The router's grpc.health.v1 service name for one expert: ``ddm.v1.Expert/expert-1``."""
    return EXPERT_HEALTH_PREFIX + name


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.samples = Counter(
            "ddm_router_sample_requests", "Sample calls by status code", ["code"], registry=r
        )
        self.images = Counter("ddm_router_images", "images sampled", registry=r)
        self.expert_calls = Counter(
            "ddm_router_expert_calls", "velocity calls per expert", ["expert"], registry=r
        )
        self.expert_rows = Counter("ddm_router_expert_rows", "rows sent per expert", ["expert"], registry=r)
        self.seconds = Histogram("ddm_router_sample_seconds", "Sample wall time", registry=r)
        self.active = Gauge("ddm_router_active_samples", "Sample calls in progress", registry=r)
        self.degraded = Counter(
            "ddm_router_degraded_samples",
            "Sample calls finished without an expert (allow_degraded)",
            ["expert"],
            registry=r,
        )


@dataclass
class RouterStats:
    """Counters since start (tests and logs; Prometheus has the same by status code)."""

    started: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0  # sampler steps run, over all requests
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:  # handler threads and RPC-end callbacks count concurrently
            setattr(self, name, getattr(self, name) + n)


class RouterServer(rpc.LoadingServer):
    """Serves the router + remote experts. ``start()`` opens the port, then loads and connects."""

    SERVICE = SERVICE

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
        max_queue: int = 64,
        defaults: SampleDefaults | None = None,
        metrics_port: int | None = None,
        cohort_delay: float = 0.005,
        cohort_rows: int = 512,
        student: str | None = None,
        device: str | Placement = "cpu",
        health_interval: float = 0.5,
    ):
        if not experts:
            raise ValueError("experts: give at least one expert address (host:port)")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.placement = Placement.of(device)  # DeviceError (a ValueError) before any port opens
        super().__init__(address, tls=tls, token=token)
        self.router_source = router
        self.student_source = student  # a distilled student checkpoint: SampleRequest.model = "student"
        self.student_runner = None
        self.trained_time_shift = 1.0  # the router checkpoint's time_shift: an unset request's default
        self.latent: dict | None = None  # the checkpoint's latent record (docs/latent.md); None: pixel space
        self.codec = None  # its decoder (ddm.expert.autoencoder.LatentCodec), loaded with the router
        self.addresses = list(experts)
        self.expert_tls, self._expert_token = expert_tls, expert_token
        self.expert_timeout, self.connect_timeout = expert_timeout, connect_timeout
        self.max_concurrent = max_concurrent
        if health_interval <= 0:
            raise ValueError(f"health_interval must be > 0 seconds, got {health_interval}")
        self.health_interval = health_interval
        self._stopping = threading.Event()
        self._health_lock = threading.Lock()
        self._published: bool | None = None  # the overall health last set by the watcher
        self._down_since: dict[str, float] = {}  # expert name -> time.monotonic() it went down
        # Load shedding (router.admission): max_concurrent Sample calls run, max_queue wait, the rest
        # get RESOURCE_EXHAUSTED at once.
        self.admission = Admission(max_concurrent, max_queue)
        self.defaults = defaults or SampleDefaults()
        self.metrics_port = metrics_port
        self.metrics = RouterMetrics()
        self.stats = RouterStats()
        self.router: RouterNet | None = None
        self.checkpoint = router if isinstance(router, str) else ""
        self.class_names: list[str] = []  # from the router checkpoint (RouterInfo.class_names)
        self.experts = ExpertSet()  # RemoteExperts in expert order; replace_expert swaps one between steps
        self.launcher: Launcher | None = None  # starts a new expert server for ReplaceExpert(checkpoint=...)
        self.on_replaced: list = []  # callables(Replacement), called after each replacement
        self._replacing = threading.Lock()
        self.router_batcher: DynamicBatcher | None = None
        # Each cohort's ensemble submits up to K expert calls at once; they mostly wait on the network.
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrent * len(self.addresses), thread_name_prefix="router-experts"
        )
        self.cohort_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_concurrent, thread_name_prefix="cohort"
        )
        self.cohorts = CohortScheduler(
            self._run_cohort,
            self.cohort_pool,
            gather=cohort_delay,
            max_rows=max(cohort_rows, self.defaults.max_n),
        )

    # -- lifecycle -----------------------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float | None = None) -> RouterServer:
        """Open the port, load the router and connect to the experts (in the background)."""
        if self.metrics_port is not None:
            self._http = start_http_server(self.metrics_port, registry=self.metrics.registry)
        # The largest reply: max_n images as uint8 plus, with include_float, as fp32 (3 x 256 x 256 max).
        self._serve(
            lambda server: pb_grpc.add_RouterServicer_to_server(_RouterServicer(self), server),
            # running + waiting Sample calls each hold a handler thread; + 8 for Info/ListExperts/health
            workers=self.max_concurrent + self.admission.max_waiting + 8,
            max_message=rpc.message_limit(self.defaults.max_n, 3 * 256 * 256 * 5),
            wait=wait,
            timeout=timeout,
        )
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        self._stopping.set()
        super().stop(grace)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.cohort_pool.shutdown(wait=False, cancel_futures=True)
        if self.router_batcher is not None:
            self.router_batcher.close()
        for expert in self.experts:
            expert.close()

    def _load(self) -> None:
        device = self.placement.device
        if isinstance(self.router_source, RouterNet):
            self.router = self.router_source.to(device).eval()
        else:
            self.router, meta = load_router_checkpoint(self.router_source, device=device)
            self.checkpoint = str(meta.get("url", self.router_source))
            self.class_names = [str(n) for n in meta.get("class_names") or []]
            self.trained_time_shift = float(meta.get("time_shift") or 1.0)  # recorded by its trainer
            if meta.get("latent"):  # a latent-space run: the router decodes each sample once, at the end
                from ddm.expert.autoencoder import codec_from_record

                self.latent = dict(meta["latent"])
                self.codec = codec_from_record(self.latent, device)
                self.placement.announce(
                    f"router server: {self.latent['autoencoder']} decoder ({self.latent['path']})"
                )
        self.placement.announce(f"router server: router net ({self.checkpoint or 'in memory'})")
        # Concurrent cohorts' router passes share one forward, as the experts' Predicts do. No added
        # delay: it only gathers what queued while the previous forward ran.
        self.router_batcher = DynamicBatcher(
            self._route,
            max_batch=self.cohorts.max_rows,
            max_delay=0.0,
            max_queue=self.max_concurrent + 8,
            name="router-batcher",
        )
        experts = [self._remote_expert(a) for a in self.addresses]
        list(self.pool.map(lambda e: e.connect(self.connect_timeout), experts))
        check_experts_fit(experts, self.router.config)
        self.experts = ExpertSet(experts)
        if self.student_source:
            from ddm.router.student_serving import StudentRunner, load_student

            student = load_student(
                self.student_source,
                num_classes=self.router.num_classes,
                image_shape=self.image_shape,
                device=device,
            )
            self.student_runner = StudentRunner(student, self.placement, self.codec)
            self.placement.announce(f"router server: student ({self.student_source})")
        for e in self.experts:
            e.liveness.on_change = lambda down, why, e=e: self._expert_changed(e, down, why)
            self._health.set(expert_health_service(e.name), health_pb2.HealthCheckResponse.SERVING)
        log.info("router connected to experts %s", [e.name for e in self.experts])

    def _remote_expert(self, address: str) -> RemoteExpert:
        return RemoteExpert(
            address,
            tls=self.expert_tls,
            token=self._expert_token,
            timeout=self.expert_timeout,
            connect_timeout=None,
            coalesce=True,
        )

    def _load_in_background(self) -> None:
        self._health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        super()._load_in_background()  # SERVING once loaded; only then may the watchers change that
        if self.ready:
            self._health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
            self._published = None  # whatever a call failing meanwhile published, set_serving overwrote
            for e in self.experts:
                threading.Thread(target=self._watch, args=(e,), name=f"watch-{e.name}", daemon=True).start()
            self._publish()

    # -- expert health ---------------------------------------------------------------------------------------

    def _watch(self, expert: RemoteExpert) -> None:
        """Check one expert's health every ``health_interval`` s; its Liveness records the outcome."""
        strikes = 0
        while not self._stopping.wait(self.health_interval) and any(e is expert for e in self.experts):
            healthy, why = expert.health(timeout=max(0.2, min(1.0, 2 * self.health_interval)))
            if healthy or why.startswith("RESOURCE_EXHAUSTED"):
                strikes = 0
                expert.liveness.ok()
            elif why.startswith("DEADLINE_EXCEEDED") and (strikes := strikes + 1) < DEADLINE_STRIKES:
                continue
            else:
                expert.liveness.failed(f"health check: {why}")

    def _expert_changed(self, expert: RemoteExpert, down: bool, why: str) -> None:
        """An expert went down or came back (a health check or a call said so): log it, publish it."""
        if self._stopping.is_set():
            return
        status = health_pb2.HealthCheckResponse
        with self._health_lock:
            if down:
                self._down_since[expert.name] = time.monotonic()
            since = self._down_since.pop(expert.name, None) if not down else None
            self._health.set(
                expert_health_service(expert.name), status.NOT_SERVING if down else status.SERVING
            )
        if down:
            log.warning(
                "expert %s at %s is down (%s): router health NOT_SERVING; Sample calls without "
                "allow_degraded that need it fail with UNAVAILABLE, calls with allow_degraded sample without it",
                expert.name, expert.address, why,
            )  # fmt: skip
        else:
            after = f" after {time.monotonic() - since:.1f} s down" if since is not None else ""
            log.warning("expert %s at %s is back%s", expert.name, expert.address, after)
        self._publish()

    @property
    def down_experts(self) -> list[str]:
        """Experts believed down now, in expert order."""
        return [e.name for e in self.experts if e.liveness.down]

    def _publish(self) -> None:
        """The router's overall health (``""`` and ``ddm.v1.Router``): SERVING only while every expert is up."""
        with self._health_lock:
            if self._stopping.is_set() or not self.ready:
                return
            down = self.down_experts
            serving, before = not down, self._published
            if serving == before:
                return
            self._published = serving
            rpc.set_serving(self._health, [SERVICE], serving)
        if not serving:
            log.warning("router health NOT_SERVING: expert(s) %s down", ", ".join(down))
        elif before is False:
            log.warning("router health SERVING again: all %d experts up", len(self.experts))

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
                if scope.cancelled:
                    raise Cancelled("request cancelled while routing") from None
                raise Expired("deadline passed while routing") from None

        return probabilities

    @property
    def image_shape(self) -> tuple[int, int, int]:
        cfg = self.router.config
        return (cfg.in_channels, cfg.image_size, cfg.image_size)

    # -- sampling --------------------------------------------------------------------------------------------

    def sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> Iterator[pb.SampleEvent]:
        """One Sample call: validate, join a cohort, relay its events (progress, then result or error)."""
        try:
            p = parse_request(
                request,
                self.defaults,
                num_classes=self.router.num_classes,
                num_experts=len(self.experts),
                models=self.models,
                trained_time_shift=self.trained_time_shift,
            )
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        remaining = rpc.remaining_time(context)
        seconds = (
            self.defaults.max_seconds if remaining is None else min(remaining, self.defaults.max_seconds)
        )
        member = Member(p, deadline=time.monotonic() + seconds, include_float=request.include_float)
        try:
            self.admission.acquire(member.deadline, context.is_active)
        except Overloaded as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"router overloaded: {e}")
        except GaveUp as e:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"router: {e}")
        member.started = time.perf_counter()  # Result.seconds: sampling time, without the admission wait
        state = {"outcome": "running"}
        release = threading.Lock()  # the slot is given back exactly once

        def on_rpc_end() -> None:  # runs when the call ends for any reason, also while we sit in a yield
            if release.acquire(blocking=False):
                self.admission.release()
            member.leave()
            if state["outcome"] == "running":
                self.stats.add("cancelled")
                log.info("Sample cancelled by its client (or its deadline passed)")

        self.stats.add("started")
        if not context.add_callback(on_rpc_end):  # the call already ended
            on_rpc_end()
            return
        self.cohorts.join(member)
        while (event := wait_event(member, context.is_active)) is not None:
            kind, payload = event
            if kind == "progress":
                yield pb.SampleEvent(progress=payload)
            elif kind == "error":
                state["outcome"] = "failed"
                self.stats.add("failed")
                context.abort(*payload)
            else:
                state["outcome"] = "done"
                self.stats.add("completed")
                payload.seconds = time.perf_counter() - member.started
                yield pb.SampleEvent(result=payload)
                return

    def _run_cohort(self, members: list[Member]) -> None:
        """Sample the members' requests as one batch and send each its progress and rows (or the error)."""
        if all(m.gone for m in members):
            return  # everyone left while the cohort was gathering
        p = members[0].params  # the cohort key: every member has the same schedule, guidance and routing
        scope = CallScope(cohort_deadline(members))
        for m in members:
            m.cohort, m.scope = members, scope
        if p.model == "student":  # one local network, guidance and steps as inputs: router/student_serving.py
            return self.student_runner.run(
                members, self.image_shape, deadline=scope.deadline, on_step=lambda: self.stats.add("steps")
            )
        held = {"lease": self.experts.lease()}  # the first step's experts; renewed between steps
        try:
            return self._sample_cohort(members, p, scope, held)
        finally:
            held["lease"].release()

    def _sample_cohort(self, members: list[Member], p, scope: CallScope, held: dict) -> None:
        """Sample one cohort. ``held["lease"]``: the experts it uses, renewed only between sampler steps,
        so a replacement (``replace_expert``) takes effect at a step boundary, never inside a step."""
        lease = held["lease"]
        try:
            noises, gens = zip(*(initial_noise(m.n, self.image_shape, m.params.seed) for m in members))
            noise = self.placement.to(torch.cat(noises))  # (N, C, H, W), each member's rows from its own seed
            degradation = Degradation(lease.experts, allowed=p.allow_degraded)
            ensemble = Ensemble(
                [e.scoped(scope) for e in lease.experts],
                degradation.router(self._routing(scope)),
                strategy=p.strategy,
                top_k=p.top_k,
                threshold=p.threshold,
                guidance_mode=p.guidance_mode,
                route_every=p.route_every,
                executor=self.pool,
            )
            x = noise
            for step in iter_sample(
                degradation.denoiser(ensemble.guided(p.guidance)),
                noise,
                self.placement.to(torch.cat([m.params.labels for m in members])),
                steps=p.steps,
                sampler=p.sampler,
                time_grid=p.time_grid,
                time_shift=p.time_shift,
                churn=p.churn,
                generator=gens[0],  # one member if stochastic
            ):
                self.stats.add("steps")
                if all(m.gone for m in members):
                    return
                x = step.x
                progress = pb.Progress(
                    step=step.index + 1, total=step.total, t=step.t_next, degraded_experts=degradation.names
                )
                for m in members:
                    m.send("progress", progress)
                if (fresh := lease.renew()) is not lease:  # an expert was replaced: the next step uses it
                    held["lease"] = lease = fresh
                    ensemble.experts[:] = [e.scoped(scope) for e in lease.experts]
                    degradation.experts[:] = lease.experts
        except Cancelled:
            return
        except ExpertFailure as e:
            log.warning(
                "Sample failed for %d request(s)%s: %s", len(members),
                "" if p.allow_degraded else " (allow_degraded not set)", e,
            )  # fmt: skip
            return broadcast(members, "error", self._expert_failed(e))
        except Expired as e:
            return broadcast(members, "error", (grpc.StatusCode.DEADLINE_EXCEEDED, f"router: {e}"))
        except QueueFull as e:
            return broadcast(members, "error", (grpc.StatusCode.RESOURCE_EXHAUSTED, f"router: {e}"))
        except Exception as e:  # a bug: tell the clients instead of leaving them waiting
            log.exception("cohort failed")
            return broadcast(members, "error", (grpc.StatusCode.INTERNAL, f"router: {type(e).__name__}: {e}"))
        counts = ensemble.calls
        for k, e in enumerate(self.experts):
            self.metrics.expert_calls.labels(e.name).inc(counts.batches[k])
            self.metrics.expert_rows.labels(e.name).inc(counts.rows[k])
        for name in degradation.names:
            self.metrics.degraded.labels(name).inc(len(members))
        if degradation.absent:
            log.warning(
                "Sample of %d request(s) finished degraded, without %s (%s)", len(members),
                ", ".join(degradation.names), "; ".join(degradation.absent[k] for k in sorted(degradation.absent)),
            )  # fmt: skip
        if self.codec is not None:
            x = self.codec.decode(x)  # (N, C, H, W) pixels in [-1, 1]: latents never leave the router
        experts = list(
            self.experts
        )  # after the last step: a replacement switched between steps is the new one
        infos = [e.info for e in experts]  # which generation of each answered (Result.expert_generations)
        for m, result in zip(members, member_results(members, x, [e.name for e in experts], counts, infos)):
            result.degraded_experts[:] = degradation.names
            self.metrics.images.inc(m.n)
            self.metrics.seconds.observe(time.perf_counter() - m.started)
            m.send("result", result)

    @staticmethod
    def _expert_failed(error: ExpertFailure) -> tuple[grpc.StatusCode, str]:
        """The status an expert failure mid-sample ends the cohort's calls with (when the request does
        not allow degraded sampling, or no expert is left: ``router.degraded``)."""
        code = error.code
        if code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
            code = grpc.StatusCode.UNAVAILABLE
        return code, str(error)

    # -- replacing an expert (router.replace) -------------------------------------------------------------

    def replace_expert(
        self,
        name: str,
        *,
        address: str = "",
        checkpoint: str = "",
        connect_timeout: float | None = None,
        drain_timeout: float = 60.0,
    ) -> Replacement:
        """Switch expert ``name`` to the server at ``address`` (or, with ``checkpoint``, to one the
        ``launcher`` starts for it) without downtime: connect and check it, swap it in between sampler
        steps, wait for the old one's steps in flight (``drain_timeout``), close the old connection.
        ReplaceError: a bad request; ReplaceBusy: another replacement runs; ExpertFailure: the new
        server did not become ready (nothing changed)."""
        if bool(address) == bool(checkpoint):
            raise ReplaceError("give the new expert's address or its checkpoint (one of them)")
        if checkpoint and self.launcher is None:
            raise ReplaceError(
                "checkpoint: this router starts no expert servers; start one (ddm serve expert) and give its "
                "address, or serve with `ddm serve run`, which does"
            )
        if not self._replacing.acquire(blocking=False):
            raise ReplaceBusy("another ReplaceExpert is running; retry when it has finished")
        try:
            return replace_expert(
                self, name, address, checkpoint, connect_timeout or self.connect_timeout, drain_timeout
            )
        finally:
            self._replacing.release()

    def list_experts(self) -> pb.ListExpertsResponse:
        def status(e: RemoteExpert) -> pb.ExpertStatus:
            healthy, why = e.health(timeout=1.0)
            return pb.ExpertStatus(name=e.name, address=e.address, healthy=healthy, info=e.info, error=why)

        return pb.ListExpertsResponse(experts=list(self.pool.map(status, self.experts)))

    @property
    def models(self) -> tuple[str, ...]:
        """What SampleRequest.model may ask for."""
        return ("ensemble", "student") if self.student_runner is not None else ("ensemble",)

    def info(self) -> pb.RouterInfo:
        down = self.down_experts
        info = router_info(
            self.defaults,
            self.router.config,
            num_experts=len(self.experts),
            checkpoint=self.checkpoint,
            ready=self.ready and not down,
            models=list(self.models),
            student_checkpoint=self.student_source or "",
            output_shape=list(self.latent["image_shape"]) if self.latent else list(self.image_shape),
            autoencoder=self.latent["autoencoder"] if self.latent else "",
        )
        info.down_experts[:] = down
        info.class_names[:] = self.class_names
        return info


class _RouterServicer(pb_grpc.RouterServicer):
    def __init__(self, server: RouterServer):
        self.s = server

    def _require_ready(self, context: grpc.ServicerContext) -> None:
        self.s.abort_unless_ready(context, "the router (loading, connecting to its experts)")

    def Sample(self, request: pb.SampleRequest, context: grpc.ServicerContext) -> Iterator[pb.SampleEvent]:
        self._require_ready(context)
        self.s.metrics.active.inc()
        code = grpc.StatusCode.OK
        try:
            yield from self.s.sample(request, context)
        except GeneratorExit:  # the client went away while a message was being sent
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = context.code() or grpc.StatusCode.UNKNOWN  # abort() set it
            raise
        finally:
            self.s.metrics.active.dec()
            self.s.metrics.samples.labels(code.name if isinstance(code, grpc.StatusCode) else str(code)).inc()

    def ListExperts(
        self, request: pb.ListExpertsRequest, context: grpc.ServicerContext
    ) -> pb.ListExpertsResponse:
        self._require_ready(context)
        return self.s.list_experts()

    def Info(self, request: pb.RouterInfoRequest, context: grpc.ServicerContext) -> pb.RouterInfo:
        self._require_ready(context)
        return self.s.info()

    def ReplaceExpert(
        self, request: pb.ReplaceExpertRequest, context: grpc.ServicerContext
    ) -> pb.ReplaceExpertResponse:
        self._require_ready(context)
        try:
            result = self.s.replace_expert(
                request.expert,
                address=request.address,
                checkpoint=request.checkpoint,
                connect_timeout=request.connect_timeout or None,
                drain_timeout=request.drain_timeout or 60.0,
            )
        except ReplaceError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ReplaceExpert: {e}")
        except ReplaceBusy as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"ReplaceExpert: {e}")
        except (ExpertFailure, RuntimeError, TimeoutError, OSError) as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"ReplaceExpert: the new expert server: {e}")
        return result.to_proto()
