"""An expert server behind the Denoiser interface: the router's ensemble calls it like a local model.

``RemoteExpert(address)`` connects (Info, waiting for the server to come up), then ``velocity`` is a
Predict call. Requests larger than the server's ``max_batch`` are split and sent concurrently (the
server batches them again). Per router request, :meth:`RemoteExpert.scoped` gives a view bound to a
:class:`CallScope`: every call's deadline is the caller's remaining time, and cancelling the scope
(the router's client went away) cancels the calls in flight. Failures raise :class:`ExpertFailure`
naming the expert, which the router turns into a status code.

Liveness (degraded sampling, ``router.degraded``): an expert whose call failed because it is down
(:data:`DOWN_CODES`) is marked down; requests that allow degradation then skip it instead of paying
for a doomed call each step. It is re-checked with grpc.health.v1 after a backoff (0.5 s doubling to
2 s) and used again as soon as it answers SERVING, or as soon as any call to it succeeds: the gRPC
channel reconnects by itself (``rpc.channel_options``), so a restarted expert on the same address
rejoins without restarting the router.

Coalescing (``coalesce=True``, what the router server uses): concurrent velocity calls from many router
requests are merged into one Predict per expert (a :class:`~ddm.expert.batching.DynamicBatcher` on
the client side, no added delay: it takes whatever queued while the previous Predict was in flight).
With 32 clients sampling at once the router then sends a few large Predicts per step instead of 32
small ones, so per-call overhead on both ends stops dominating and the expert's own batcher sees big
batches. A request that leaves (deadline, cancellation) stops waiting at once; the shared call goes on
for the others, and is cancelled (so the expert drops its queued rows) once every caller has left. Its
deadline is the latest of its callers' deadlines. Requests larger than the server's ``max_batch``
bypass it and are sent in chunks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import torch

from ddm.expert.batching import DynamicBatcher, Expired, QueueFull
from ddm.proto import rpc
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.router.client import ExpertClient

# Codes meaning "this expert is down or broken" (not slow, not overloaded, not our bad request): the
# ones degraded sampling may drop an expert for.
DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})


class ExpertFailure(RuntimeError):
    """A Predict/Info call to an expert failed; names the expert and carries the gRPC status code."""

    def __init__(self, name: str, address: str, code: grpc.StatusCode, details: str):
        self.name, self.address, self.code, self.details = name, address, code, details
        super().__init__(f"expert {name} at {address}: {code.name}: {details}")


class Cancelled(RuntimeError):
    """The request the expert call was made for was cancelled (its client went away)."""


class CallScope:
    """Deadline and cancellation shared by every expert call made for one router request."""

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline  # time.monotonic() value, None = no deadline
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._inflight: set[grpc.Future] = set()

    @classmethod
    def from_timeout(cls, seconds: float | None) -> CallScope:
        return cls(None if seconds is None else time.monotonic() + seconds)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def cancel(self) -> None:
        self._cancelled.set()
        with self._lock:
            inflight = list(self._inflight)
        for future in inflight:
            future.cancel()

    def _track(self, future: grpc.Future) -> None:
        with self._lock:
            self._inflight.add(future)
        if self.cancelled:
            future.cancel()

    def _untrack(self, future: grpc.Future) -> None:
        with self._lock:
            self._inflight.discard(future)


class Liveness:
    """Whether an expert is believed down, with a health re-check after an exponential backoff."""

    def __init__(
        self,
        check: Callable[[], tuple[bool, str]],
        *,
        base: float = 0.5,
        cap: float = 10.0,
        on_change: Callable[[bool, str], None] | None = None,
    ):
        self._check, self.base, self.cap = check, base, cap
        self.on_change = on_change  # (down, why) on every up <-> down transition, outside the lock
        self._lock = threading.Lock()
        self.down = False
        self.why = ""
        self.failures = 0  # consecutive
        self._next_check = 0.0
        self._checking = False

    def failed(self, why: str) -> None:
        with self._lock:
            changed = not self.down
            self.down, self.why = True, why
            self.failures += 1
            self._next_check = time.monotonic() + min(self.cap, self.base * 2 ** (self.failures - 1))
        if changed and self.on_change is not None:
            self.on_change(True, why)

    def ok(self) -> None:
        if self.down or self.failures:
            with self._lock:
                changed = self.down
                self.down, self.why, self.failures = False, "", 0
            if changed and self.on_change is not None:
                self.on_change(False, "")

    def is_down(self) -> bool:
        """False once the expert is believed up; while down, one caller re-checks health when due."""
        with self._lock:
            if not self.down:
                return False
            if self._checking or time.monotonic() < self._next_check:
                return True
            self._checking = True
        try:
            healthy, why = self._check()
        finally:
            with self._lock:
                self._checking = False
        if healthy:
            self.ok()
            return False
        self.failed(why or self.why)
        return True


class RemoteExpert:
    """Denoiser over gRPC. Attributes after :meth:`connect`: ``info``, ``name``, ``num_classes``."""

    def __init__(
        self,
        address: str,
        *,
        tls: rpc.ClientTLS | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float | None = 30.0,
        max_message: int = 256 * rpc.MiB,
        name: str | None = None,
        coalesce: bool = False,
    ):
        self.address = address
        self.timeout = timeout
        self._dial = dict(tls=tls, token=token, timeout=timeout, max_message=max_message)
        self.client = ExpertClient(address, **self._dial)
        self.info: pb.ExpertInfo | None = None
        self.coalesce = coalesce
        self.batcher: DynamicBatcher | None = None  # coalesces concurrent calls, after connect()
        self._name = name
        self.liveness = Liveness(lambda: self.health(timeout=0.5), cap=2.0)
        if connect_timeout is not None:
            self.connect(connect_timeout)

    def connect(self, timeout: float) -> pb.ExpertInfo:
        """Fetch Info, waiting up to ``timeout`` s for the server to be up and loaded; raises ExpertFailure.

        A server that is still loading its checkpoint has its port open and answers UNAVAILABLE, which
        ``wait_for_ready`` does not wait through (it only waits for a connection). So UNAVAILABLE is
        retried with backoff (50 ms doubling to 1 s) exactly like an unreachable server, until the
        timeout; the error then says what the expert last answered. Other codes fail at once."""
        deadline = time.monotonic() + timeout
        pause, last = 0.05, None  # last: what a reachable but unready server said
        while True:
            try:
                left = max(0.001, deadline - time.monotonic())
                self.info = self.client.info(timeout=left, wait_for_ready=True)
                break
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                last = f"UNAVAILABLE: {details}"
            elif code != grpc.StatusCode.DEADLINE_EXCEEDED or last is None:
                raise ExpertFailure(self.name, self.address, code, details)
            left = deadline - time.monotonic()
            if left <= 0 or code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ExpertFailure(
                    self.name,
                    self.address,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"not ready after {timeout:g} s; it last said {last}",
                )
            time.sleep(min(pause, left))
            pause = min(1.0, pause * 2)
        if self.coalesce and self.batcher is None:
            self.batcher = DynamicBatcher(
                self._coalesced_call,
                max_batch=max(1, self.info.max_batch),
                max_delay=0.0,
                max_queue=4096,
                name=f"to-{self.info.name}",
            )
        return self.info

    @property
    def name(self) -> str:
        return self._name or (self.info.name if self.info is not None else self.address)

    @property
    def num_classes(self) -> int:
        return self._require_info().num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self._require_info().image_shape
        return (c, h, w)

    def _require_info(self) -> pb.ExpertInfo:
        if self.info is None:
            raise RuntimeError(f"expert {self.address} not connected; call connect() first")
        return self.info

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """v (N, C, H, W) with this expert's own timeout as the deadline."""
        return self.predict(x_t, t, y, CallScope.from_timeout(self.timeout))

    def scoped(self, scope: CallScope) -> ScopedExpert:
        """A view whose calls obey ``scope`` (one router request's deadline and cancellation)."""
        return ScopedExpert(self, scope)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scope: CallScope) -> torch.Tensor:
        """v (N, C, H, W) within ``scope``: coalesced with other callers, or sent directly in chunks."""
        info = self._require_info()
        if scope.cancelled:
            raise Cancelled(f"request cancelled before calling expert {self.name}")
        remaining = scope.remaining()
        timeout = self.timeout if remaining is None else min(self.timeout, remaining)
        if timeout <= 0:
            raise ExpertFailure(
                self.name, self.address, grpc.StatusCode.DEADLINE_EXCEEDED, "no time left for the call"
            )
        if self.batcher is None or x_t.shape[0] > info.max_batch:
            return self._call(x_t, t, y, timeout, scope)
        try:
            req = self.batcher.submit(x_t, t, y, deadline=scope.deadline)
        except QueueFull as e:
            raise ExpertFailure(self.name, self.address, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        while not req.done.wait(0.05):  # wake up now and then to notice a cancelled request
            if scope.cancelled:
                req.cancel()
                raise Cancelled(f"request cancelled while waiting for expert {self.name}")
            if scope.deadline is not None and time.monotonic() >= scope.deadline:
                req.cancel()
                raise ExpertFailure(
                    self.name, self.address, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed"
                )
        if isinstance(req.error, Expired):
            if scope.cancelled:
                raise Cancelled(f"request cancelled while waiting for expert {self.name}")
            raise ExpertFailure(self.name, self.address, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed")
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _coalesced_call(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One Predict for the rows of several callers (runs on the batcher's thread): its deadline is
        the latest caller's, and it is cancelled once every caller has left."""
        callers = list(self.batcher.current) if self.batcher is not None else []
        deadlines = [r.deadline for r in callers]
        timeout = self.timeout
        if deadlines and None not in deadlines:
            timeout = min(timeout, max(deadlines) - time.monotonic())
        if timeout <= 0:
            raise Expired("deadline passed before the call")

        def abandoned() -> bool:
            return bool(callers) and all(r.cancelled for r in callers)

        return self._call(x_t, t, y, timeout, None, abandoned)

    def _call(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        timeout: float,
        scope: CallScope | None,
        abandoned: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Predict in chunks of at most ``max_batch`` rows, all in flight at once; (N, C, H, W).

        Marks the expert up or down (:class:`Liveness`) by the outcome. ``abandoned``: polled while
        waiting; once true the calls are cancelled (the expert server then skips their queued rows)."""
        step = max(1, self._require_info().max_batch)
        chunks = [(x_t[i : i + step], t[i : i + step], y[i : i + step]) for i in range(0, x_t.shape[0], step)]
        futures = []
        for cx, ct, cy in chunks:
            future = self.client.stub.Predict.future(
                ExpertClient.request(cx, ct, cy), timeout=timeout, metadata=self.client.metadata
            )
            if scope is not None:
                scope._track(future)
            futures.append(future)
        try:
            if abandoned is not None:
                finished = _all_done(futures)
                while not finished.wait(0.05):
                    if abandoned():
                        raise Cancelled(f"every caller left while expert {self.name} was computing")
            parts = [ExpertClient.velocity_of(f.result(), cx) for f, (cx, _, _) in zip(futures, chunks)]
        except grpc.FutureCancelledError:
            raise Cancelled(f"request cancelled while expert {self.name} was computing") from None
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and scope is not None and scope.cancelled:
                raise Cancelled(f"request cancelled while expert {self.name} was computing") from None
            if e.code() in DOWN_CODES:
                self.liveness.failed(f"{e.code().name}: {e.details() or ''}")
            raise ExpertFailure(self.name, self.address, e.code(), e.details() or "") from None
        finally:
            for future in futures:
                future.cancel()  # no-op for finished calls; stops the rest after a failure
                if scope is not None:
                    scope._untrack(future)
        self.liveness.ok()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def health(self, *, timeout: float = 1.0) -> tuple[bool, str]:
        return self.client.health(timeout=timeout)

    def reconnect(self) -> None:
        """Dial again on a fresh channel. For whoever knows the server was just restarted (the stack's
        supervisor): the old channel would retry only after its reconnect backoff (up to 5 s)."""
        old, self.client = self.client, ExpertClient(self.address, **self._dial)
        old.close()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.client.close()


def _all_done(futures: list[grpc.Future]) -> threading.Event:
    """An event set once every future has finished (successfully or not)."""
    finished, lock, left = threading.Event(), threading.Lock(), [len(futures)]

    def on_done(_: grpc.Future) -> None:
        with lock:
            left[0] -= 1
            if left[0] == 0:
                finished.set()

    for future in futures:
        future.add_done_callback(on_done)  # runs at once for a finished future
    return finished


class ScopedExpert:
    """A RemoteExpert seen through one request's :class:`CallScope` (a Denoiser)."""

    def __init__(self, remote: RemoteExpert, scope: CallScope):
        self.remote = remote
        self.scope = scope
        self.num_classes = remote.num_classes
        self.name = remote.name

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.remote.predict(x_t, t, y, self.scope)


def check_experts_fit(experts: list[RemoteExpert], router_config: Any) -> None:
    """Raise ValueError unless the connected experts are the ones the router was trained for: one per
    router output, in expert order, with the router's classes and image shape."""
    cfg = router_config
    if cfg.num_experts != len(experts):
        raise ValueError(
            f"--expert: {len(experts)} expert addresses but the router was trained for {cfg.num_experts}; "
            "give one address per expert, in expert order"
        )
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    for k, e in enumerate(experts):
        if e.num_classes != cfg.num_classes or e.image_shape != shape:
            raise ValueError(
                f"expert {e.name} at {e.address}: num_classes {e.num_classes}, images {e.image_shape}, "
                f"but the router has {cfg.num_classes}, {shape}; experts and router must come from one run"
            )
        if e.info.expert_index not in (-1, k):
            raise ValueError(
                f"--expert #{k} ({e.address}) serves {e.name} (expert index {e.info.expert_index}); "
                "list the expert addresses in expert order"
            )
