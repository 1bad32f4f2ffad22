"""Python clients for the ddm gRPC API: :class:`RouterClient` (sample through the router, list
experts) and :class:`ExpertClient` (Predict and Info on one expert server).

Both speak only the wire format of ``ddm/v1/ddm.proto``; tensors come back as torch tensors. Errors
are ``grpc.RpcError`` with the server's status code and a message naming what was wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from ddm.core.device import to_device
from ddm.proto import rpc
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.proto.ddm.v1 import ddm_pb2_grpc as pb_grpc
from ddm.proto.tensors import FLOATS, TensorError, from_proto, to_proto

ProgressFn = Callable[[int, int, float], None]  # (finished step, total steps, t reached)


class _Client:
    def __init__(
        self,
        address: str,
        *,
        tls: rpc.ClientTLS | None,
        token: str | None,
        timeout: float,
        max_message: int,
        channel: grpc.Channel | None,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.address = address
        self.timeout = timeout
        self.channel = channel or rpc.make_channel(address, tls=tls, max_message=max_message)
        self.metadata = rpc.auth_metadata(token)

    def health(self, service: str = "", *, timeout: float = 1.0) -> tuple[bool, str]:
        """(healthy, why not) of ``service`` (default: the server as a whole) from grpc.health.v1."""
        return rpc.check_health(self.channel, service, timeout=timeout)

    def health_list(self, *, timeout: float = 1.0) -> dict[str, str]:
        """Every health service the server knows -> ``SERVING`` / ``NOT_SERVING`` (grpc.health.v1 List)."""
        return rpc.list_health(self.channel, timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ExpertClient(_Client):
    """Predict/Info on one expert server (or a headless Service of replicas: round_robin)."""

    def __init__(
        self,
        address: str,
        *,
        tls: rpc.ClientTLS | None = None,
        token: str | None = None,
        timeout: float = 30.0,
        max_message: int = 256 * rpc.MiB,
        channel: grpc.Channel | None = None,
    ):
        super().__init__(
            address, tls=tls, token=token, timeout=timeout, max_message=max_message, channel=channel
        )
        self.stub = pb_grpc.ExpertStub(self.channel)

    def info(self, *, timeout: float | None = None, wait_for_ready: bool = False) -> pb.ExpertInfo:
        """The server's ExpertInfo; ``wait_for_ready`` waits (up to the timeout) for it to come up."""
        return self.stub.Info(
            pb.InfoRequest(),
            timeout=timeout or self.timeout,
            metadata=self.metadata,
            wait_for_ready=wait_for_ready,
        )

    @staticmethod
    def request(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> pb.PredictRequest:
        """x_t (N, C, H, W) float, t (N,) float, y (N,) int -> PredictRequest (fp32 / fp32 / int64)."""
        return pb.PredictRequest(x_t=to_proto(x_t.float()), t=to_proto(t.float()), y=to_proto(y.long()))

    @staticmethod
    def velocity_of(reply: pb.PredictResponse, like: torch.Tensor) -> torch.Tensor:
        """The reply's v, checked to have x_t's shape (a mismatched server fails loudly), on x_t's device:
        the wire is the only place tensors leave (``to_proto``) and re-enter a device."""
        try:
            v = from_proto(reply.v, "v", dtypes=FLOATS, shape=tuple(like.shape))  # (N, C, H, W) on the host
        except TensorError as e:
            raise ValueError(f"expert reply: {e}") from None
        return to_device(v, like.device)

    def predict(
        self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, timeout: float | None = None
    ) -> torch.Tensor:
        """v(x_t, t, y) (N, C, H, W) from the server; N at most ``info().max_batch``."""
        reply = self.stub.Predict(
            self.request(x_t, t, y), timeout=timeout or self.timeout, metadata=self.metadata
        )
        return self.velocity_of(reply, x_t)


@dataclass(frozen=True)
class ExpertStatus:
    name: str
    address: str
    healthy: bool
    info: pb.ExpertInfo | None
    error: str = ""


@dataclass(frozen=True)
class SampleInfo:
    """Everything in the final Result besides the images."""

    labels: torch.Tensor  # (N,) long
    expert_calls: dict[str, int]  # expert name -> Predict calls for this request
    expert_rows: dict[str, int]  # expert name -> rows those calls carried
    seconds: float  # wall time on the router
    seed: int
    degraded_experts: list[str] = field(default_factory=list)
    samples: torch.Tensor | None = None  # (N, C, H, W) float in [-1, 1], with include_float=True
    progress_events: int = 0
    batched_with: int = 0  # other requests the router sampled in the same batch (counted in expert_calls)
    # expert name -> (generation, lifecycle) of the expert that answered (Result.expert_generations)
    expert_generations: dict[str, tuple[int, str]] = field(default_factory=dict)


class RouterClient(_Client):
    """Sample through a router server; list its experts."""

    def __init__(
        self,
        address: str,
        *,
        tls: rpc.ClientTLS | None = None,
        token: str | None = None,
        timeout: float = 600.0,
        max_message: int = 512 * rpc.MiB,
        channel: grpc.Channel | None = None,
    ):
        super().__init__(
            address, tls=tls, token=token, timeout=timeout, max_message=max_message, channel=channel
        )
        self.stub = pb_grpc.RouterStub(self.channel)

    def info(self, *, timeout: float = 10.0) -> pb.RouterInfo:
        return self.stub.Info(pb.RouterInfoRequest(), timeout=timeout, metadata=self.metadata)

    def replace_expert(
        self,
        expert: str,
        *,
        address: str = "",
        checkpoint: str = "",
        connect_timeout: float = 0.0,
        drain_timeout: float = 0.0,
        timeout: float = 600.0,
    ) -> pb.ReplaceExpertResponse:
        """Admin: switch ``expert`` to the server at ``address``, or to a new one the router's host starts
        for ``checkpoint`` (``ddm serve run``); returns what answered before and what answers now."""
        request = pb.ReplaceExpertRequest(
            expert=expert, address=address, checkpoint=checkpoint,
            connect_timeout=connect_timeout, drain_timeout=drain_timeout,
        )  # fmt: skip
        return self.stub.ReplaceExpert(request, timeout=timeout, metadata=self.metadata)

    def list_experts(self, *, timeout: float = 10.0) -> list[ExpertStatus]:
        reply = self.stub.ListExperts(pb.ListExpertsRequest(), timeout=timeout, metadata=self.metadata)
        return [
            ExpertStatus(e.name, e.address, e.healthy, e.info if e.HasField("info") else None, e.error)
            for e in reply.experts
        ]

    def sample(
        self,
        n: int,
        labels: Sequence[int] | torch.Tensor | None = None,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        strategy: str | None = None,
        top_k: int | None = None,
        threshold: float | None = None,
        seed: int | None = None,
        time_shift: float | None = None,
        churn: float | None = None,
        time_grid: str | None = None,
        guidance_mode: str | None = None,
        route_every: int | None = None,
        model: str | None = None,
        include_float: bool = False,
        allow_degraded: bool = False,
        timeout: float | None = None,
        on_progress: ProgressFn | None = None,
    ) -> tuple[torch.Tensor, SampleInfo]:
        """Sample ``n`` images; returns (uint8 images (N, C, H, W), :class:`SampleInfo`).

        ``labels``: None cycles the classes 0, 1, 2, ...; else n labels (num_classes = unconditional).
        Unset options take the router's defaults (``info()``). ``model="student"`` samples the distilled
        student the router serves (one pass per step) instead of the ensemble. ``allow_degraded``: the
        router may drop an expert that goes down and finish with the others (listed in
        ``SampleInfo.degraded_experts``). ``on_progress(step, total, t)`` is called per sampler step; if
        it raises, the call is cancelled (the router stops) and the error propagates.
        """
        request = pb.SampleRequest(n=n, include_float=include_float, allow_degraded=allow_degraded)
        if labels is not None:
            request.labels[:] = [
                int(v) for v in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)
            ]
        for name, value in dict(
            guidance=guidance,
            steps=steps,
            sampler=sampler,
            strategy=strategy,
            top_k=top_k,
            threshold=threshold,
            seed=seed,
            time_shift=time_shift,
            churn=churn,
            time_grid=time_grid,
            guidance_mode=guidance_mode,
            route_every=route_every,
            model=model,
        ).items():
            if value is not None:
                setattr(request, name, value)
        stream = self.stub.Sample(request, timeout=timeout or self.timeout, metadata=self.metadata)
        events = 0
        try:
            for event in stream:
                if event.HasField("progress"):
                    events += 1
                    if on_progress is not None:
                        p = event.progress
                        on_progress(p.step, p.total, p.t)
                    continue
                return self._result(event.result, events)
        except BaseException:
            stream.cancel()  # the router sees the cancellation and stops sampling
            raise
        raise RuntimeError(f"router {self.address} closed the Sample stream without a result")

    @staticmethod
    def _result(result: pb.Result, events: int) -> tuple[torch.Tensor, SampleInfo]:
        images = from_proto(result.images, "images", dtypes=("UINT8",))
        samples = from_proto(result.samples, "samples", dtypes=FLOATS) if result.HasField("samples") else None
        info = SampleInfo(
            labels=torch.tensor(list(result.labels), dtype=torch.long),
            expert_calls={c.name: c.calls for c in result.expert_calls},
            expert_rows={c.name: c.rows for c in result.expert_calls},
            seconds=result.seconds,
            seed=result.seed,
            degraded_experts=list(result.degraded_experts),
            samples=samples,
            progress_events=events,
            batched_with=result.batched_with,
            expert_generations={g.name: (g.generation, g.lifecycle) for g in result.expert_generations},
        )
        return images, info
