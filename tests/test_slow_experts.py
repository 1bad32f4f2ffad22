"""Slow experts: the router's expert calls carry the client's remaining time as their deadline, and a
client that leaves cancels them, so an expert server drops the queued rows instead of computing them
for nobody. The experts here gather for 1 s before each forward: slower than the clients wait."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_fixtures import expert_checkpoint, router_checkpoint

from ddm.expert.server import ExpertServer
from ddm.proto.ddm.v1 import ddm_pb2 as pb
from ddm.proto.ddm.v1 import ddm_pb2_grpc as pb_grpc
from ddm.router.client import RouterClient
from ddm.router.server import RouterServer


@pytest.fixture
def slow_stack(tmp_path: Path) -> Iterator[tuple[RouterServer, list[ExpertServer]]]:
    experts = [
        ExpertServer(expert_checkpoint(tmp_path, k), max_delay=1.0).start(timeout=30) for k in range(2)
    ]
    router_checkpoint(tmp_path, 2)
    router = RouterServer(
        str(tmp_path / "router/checkpoints"), [e.target for e in experts], cohort_delay=0, expert_timeout=60
    ).start(timeout=30)
    yield router, experts
    router.stop(0)
    for e in experts:
        e.stop(0)


def _settled_expert_stats(experts: list[ExpertServer]) -> tuple[int, int, int]:
    """(requests, forwards, dropped) over the experts once every accepted request has been handled."""
    deadline = time.monotonic() + 5
    while any(e.batcher.pending for e in experts) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    stats = [e.batcher.stats for e in experts]
    return sum(s.requests for s in stats), sum(s.batches for s in stats), sum(s.expired for s in stats)


def test_the_clients_remaining_time_is_the_expert_calls_deadline(slow_stack) -> None:
    router, experts = slow_stack
    with RouterClient(router.target) as client:
        # Warm up first (connections, the router's first forward) so the timed call reaches the experts
        # well inside its deadline even on a busy machine; only the timed call's counts are compared.
        client.sample(1, steps=1, strategy="full", timeout=30)
        before = _settled_expert_stats(experts)
        with pytest.raises(grpc.RpcError) as err:
            client.sample(1, steps=5, strategy="full", timeout=0.5)  # the experts gather for 1 s
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    requests, forwards, dropped = (a - b for a, b in zip(_settled_expert_stats(experts), before))
    # the Predicts carried ~0.5 s, not the router's 60 s expert timeout: dropped unseen, never computed
    assert requests == 2 and forwards == 0 and dropped == 2


def test_a_cancelled_client_stops_the_expert_work_it_started(slow_stack) -> None:
    router, experts = slow_stack
    with grpc.insecure_channel(router.target) as channel:
        call = pb_grpc.RouterStub(channel).Sample(pb.SampleRequest(n=1, steps=5, strategy="full"), timeout=30)
        deadline = time.monotonic() + 5
        while sum(e.batcher.pending for e in experts) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # both experts hold the first step's rows, gathering
        call.cancel()
    requests, forwards, dropped = _settled_expert_stats(experts)
    assert requests == 2 and forwards == 0 and dropped == 2  # cancelled down the chain, rows never computed
    assert router.stats.cancelled == 1 and router.stats.completed == 0
