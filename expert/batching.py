"""Dynamic batching: concurrent requests share one forward pass.

gRPC handler threads :meth:`DynamicBatcher.submit` their rows and wait; one worker thread takes the
oldest request, keeps gathering more until the batch holds ``max_batch`` rows or ``max_delay`` seconds
have passed since it started gathering, drops requests whose deadline passed or whose caller left
(no compute for nobody), runs the function once on the concatenation and hands each request its rows.

Why one worker: the model is one set of weights on a CPU; two forwards at once only fight for the same
cores. Batching is what raises throughput, because a DiT forward on 64 rows costs far less than 64
forwards on one row. Rows of different requests may have different t and labels (the DiT conditions
per row), so any requests can share a batch.

Back-pressure: at most ``max_queue`` requests may be pending (queued or being gathered); beyond that
:class:`QueueFull` is raised at once (the server answers RESOURCE_EXHAUSTED) instead of letting
latency grow without bound.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BatchFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class QueueFull(Exception):
    """Too many pending requests; the caller should back off (RESOURCE_EXHAUSTED)."""


class Expired(Exception):
    """The request's deadline passed or its caller cancelled before it was computed."""


@dataclass
class Request:
    """One caller's rows and, once done, its result (or the error)."""

    x_t: torch.Tensor  # (n, C, H, W)
    t: torch.Tensor  # (n,)
    y: torch.Tensor  # (n,)
    deadline: float | None  # time.monotonic() after which nobody wants the answer
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None  # (n, C, H, W)
    error: BaseException | None = None
    cancelled: bool = False

    @property
    def rows(self) -> int:
        return self.x_t.shape[0]

    def cancel(self) -> None:
        """The caller left (client cancelled); the worker skips it if not yet computed."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.cancelled or (self.deadline is not None and now >= self.deadline)


@dataclass
class BatchStats:
    """Counters since start (the server's Prometheus metrics mirror them)."""

    requests: int = 0  # accepted requests
    rows: int = 0  # rows computed
    batches: int = 0  # forward passes
    expired: int = 0  # requests dropped before compute
    rejected: int = 0  # QueueFull
    largest_batch: int = 0  # most rows in one forward


class DynamicBatcher:
    """Runs ``fn(x_t, t, y) -> v`` on batches gathered from concurrent :meth:`submit` calls."""

    def __init__(
        self,
        fn: BatchFn,
        *,
        max_batch: int,
        max_delay: float,
        max_queue: int,
        on_batch: Callable[[int, int, float], None] | None = None,
        name: str = "batcher",
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 0 <= max_delay <= 10:
            raise ValueError(f"max_delay must be in [0, 10] seconds, got {max_delay}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.on_batch = on_batch  # (rows, requests, seconds) after each forward
        self.stats = BatchStats()
        self._queue: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._pending = 0  # submitted and not yet finished
        self._closed = False
        # The requests of the batch ``fn`` is computing (read by ``fn`` itself, on the worker thread:
        # a client-side batcher derives the shared call's deadline and cancellation from them).
        self.current: list[Request] = []
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(
        self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, deadline: float | None
    ) -> Request:
        """Queue rows for the next batch; raises :class:`QueueFull` when ``max_queue`` are pending."""
        if x_t.shape[0] > self.max_batch:
            raise ValueError(f"{x_t.shape[0]} rows exceed max_batch {self.max_batch}")
        req = Request(x_t, t, y, deadline)
        with self._cond:
            if self._closed:
                raise QueueFull("the batcher is shutting down")
            if self._pending >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{self._pending} requests pending (max_queue {self.max_queue})")
            self._pending += 1
            self.stats.requests += 1
            self._queue.append(req)
            self._cond.notify()
        return req

    def wait(self, req: Request, timeout: float | None) -> torch.Tensor:
        """The request's rows of the batch output; :class:`Expired` if it was dropped or timed out."""
        if not req.done.wait(timeout):
            req.cancel()
            raise Expired("deadline passed while queued")
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def close(self) -> None:
        """Stop the worker; requests still queued fail with Expired."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # -----------------------------------------------------------------------------------------------

    def _gather(self) -> list[Request] | None:
        """Block for the first request, then gather up to max_batch rows or max_delay seconds."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch = [self._queue.popleft()]
            rows = batch[0].rows
            end = time.monotonic() + self.max_delay
            while rows < self.max_batch:
                if not self._queue:
                    remaining = end - time.monotonic()
                    if remaining <= 0 or self._closed:
                        break
                    self._cond.wait(remaining)
                    continue
                if rows + self._queue[0].rows > self.max_batch:
                    break  # stays first in line for the next batch
                req = self._queue.popleft()
                batch.append(req)
                rows += req.rows
            return batch

    def _finish(self, req: Request) -> None:
        with self._cond:
            self._pending -= 1
        req.done.set()

    def _run(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                break
            now = time.monotonic()
            live = []
            for req in batch:
                if req.expired(now):
                    self.stats.expired += 1
                    req.error = Expired("deadline passed or caller cancelled before compute")
                    self._finish(req)
                else:
                    live.append(req)
            if live:
                self._compute(live)
        with self._cond:
            leftover, self._queue = list(self._queue), collections.deque()
        for req in leftover:
            req.error = Expired("server shutting down")
            self._finish(req)

    def _compute(self, batch: list[Request]) -> None:
        start = time.perf_counter()
        self.current = batch
        try:
            v = self.fn(
                torch.cat([r.x_t for r in batch]),  # (B, C, H, W)
                torch.cat([r.t for r in batch]),  # (B,)
                torch.cat([r.y for r in batch]),  # (B,)
            )  # (B, C, H, W)
            parts = v.split([r.rows for r in batch])
        except Exception as e:  # a failed forward fails its requests, never the worker
            for req in batch:
                req.error = e
                self._finish(req)
            return
        finally:
            self.current = []
        rows = sum(r.rows for r in batch)
        self.stats.batches += 1
        self.stats.rows += rows
        self.stats.largest_batch = max(self.stats.largest_batch, rows)
        if self.on_batch is not None:
            self.on_batch(rows, len(batch), time.perf_counter() - start)
        for req, part in zip(batch, parts):
            req.result = part
            self._finish(req)
