"""Cohorts: concurrent Sample requests with the same schedule sampled as one batch, in lockstep.

Per-request sampling costs the router a sampler step, an ensemble mix, a router pass and K expert calls
per request per step, however small the request; with 32 clients asking for 4 images each, that
overhead (Python, gRPC, small forwards on the expert servers) outweighs the compute. A cohort runs the
requests that arrive together as one batch: one step, one router pass, at most K Predicts per step, as
the in-process ensemble would. Each request keeps its own noise (its seed), labels, progress stream
and result rows; its numbers equal a solo run's up to float summation order.

A request joins the open cohort for its key (``SampleParams.cohort_key``) or opens one; a cohort starts
``gather`` seconds after it opened (or at once when full), so a request waits at most that once per
call, not per step. Requests that cannot share (the stochastic sampler) run alone. A member whose
client leaves stops receiving events; the cohort stops when all members have left.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from ddm.expert.images import to_uint8
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.proto.tensors import to_proto
from ddm.router.sample_request import SampleParams


@dataclass
class Member:
    """One Sample request inside a cohort; the cohort's runner talks to its handler through ``events``."""

    params: SampleParams
    deadline: float | None  # time.monotonic(); None: no deadline
    include_float: bool = False  # the client wants the float samples too
    started: float = field(default_factory=time.perf_counter)
    # ("progress" | "result" | "error", payload), filled by the cohort's runner
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    gone: bool = False  # the client left
    cohort: list[Member] = field(default_factory=list)  # set by the runner
    scope: Any = None  # the cohort's CallScope, set by the runner

    def leave(self) -> None:
        """The client went away; the last member to leave stops the cohort's expert calls."""
        self.gone = True
        if self.scope is not None and all(m.gone for m in self.cohort):
            self.scope.cancel()

    @property
    def n(self) -> int:
        return self.params.n

    def send(self, kind: str, payload: Any) -> None:
        if not self.gone:
            self.events.put((kind, payload))


class CohortScheduler:
    """Groups members by key and hands each full or timed-out group to ``run(members)`` on ``executor``."""

    def __init__(self, run: Callable[[list[Member]], None], executor: Any, *, gather: float, max_rows: int):
        if gather < 0 or max_rows < 1:
            raise ValueError(f"gather must be >= 0 s and max_rows >= 1, got {gather}, {max_rows}")
        self.run, self.executor = run, executor
        self.gather, self.max_rows = gather, max_rows
        self._lock = threading.Lock()
        self._open: dict[tuple, list[Member]] = {}
        self.cohorts = 0  # cohorts started
        self.members = 0  # requests that went through a cohort

    def join(self, member: Member) -> None:
        key = member.params.cohort_key()
        with self._lock:
            if key is None or self.gather == 0:
                return self._start([member])
            group = self._open.get(key)
            if group is not None and sum(m.n for m in group) + member.n > self.max_rows:
                del self._open[key]  # full: start it now, this member opens the next one
                self._start(group)
                group = None
            if group is None:
                group = self._open[key] = []
                timer = threading.Timer(self.gather, self._close, args=(key, group))
                timer.daemon = True
                timer.start()
            group.append(member)

    def _close(self, key: tuple, group: list[Member]) -> None:
        with self._lock:
            if self._open.get(key) is not group:
                return  # already started because it filled up
            del self._open[key]
            try:
                self._start(group)
            except RuntimeError:  # the executor was shut down: the server is stopping
                for m in group:
                    m.send("error", (grpc.StatusCode.UNAVAILABLE, "the router is shutting down"))

    def _start(self, group: list[Member]) -> None:  # called under the lock
        self.cohorts += 1
        self.members += len(group)
        self.executor.submit(self.run, group)


def cohort_deadline(members: list[Member]) -> float | None:
    """The latest member deadline (a cohort runs as long as any member may still want it)."""
    deadlines = [m.deadline for m in members]
    return None if any(d is None for d in deadlines) else max(deadlines)


def wait_event(member: Member, is_active: Callable[[], bool], poll: float = 0.1) -> tuple[str, Any] | None:
    """The member's next event; None once its client has gone (checked every ``poll`` seconds)."""
    while True:
        try:
            return member.events.get(timeout=poll)
        except queue.Empty:
            if member.gone or not is_active():
                member.gone = True
                return None


def broadcast(members: list[Member], kind: str, payload: Any) -> None:
    for m in members:
        m.send(kind, payload)


def member_results(
    members: list[Member], x: torch.Tensor, names: list[str], counts: Any, infos: Sequence[Any] = ()
) -> list[pb.Result]:
    """Each member's Result: its rows of the cohort's samples x (N, C, H, W) as uint8 (and float if
    asked), its labels and seed, the cohort's expert calls (``counts``: the ensemble's CallCounts) and,
    given the experts' ``infos`` (their ExpertInfo, in expert order), which generation of each answered."""
    calls = [
        pb.ExpertCalls(name=n, calls=counts.batches[k], rows=counts.rows[k]) for k, n in enumerate(names)
    ]
    generations = expert_generations(infos)
    results = []
    for m, x_m in zip(members, x.split([m.n for m in members])):  # (n, C, H, W) each
        result = pb.Result(
            labels=m.params.labels.tolist(),
            seed=m.params.seed,
            expert_calls=calls,
            batched_with=len(members) - 1,
            expert_generations=generations,
        )
        to_proto(to_uint8(x_m), result.images)
        if m.include_float:
            to_proto(x_m.float(), result.samples)
        results.append(result)
    return results


def expert_generations(infos: Sequence[Any]) -> list[pb.ExpertGeneration]:
    """``Result.expert_generations`` from the experts' ExpertInfo (None for one not connected yet)."""
    return [
        pb.ExpertGeneration(name=i.name, generation=i.generation, lifecycle=i.lifecycle)
        for i in infos
        if i is not None
    ]
