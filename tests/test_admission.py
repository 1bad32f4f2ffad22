"""Router load shedding (router/admission.py): at most max_concurrent Sample calls run and max_queue
wait, first come first served; beyond that RESOURCE_EXHAUSTED at once. Unit tests of the admission
rule, then a real router whose experts are slow, hit by more clients than it admits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_fixtures import expert_checkpoint, router_checkpoint

from ddm.expert.server import ExpertServer
from ddm.router.admission import Admission, GaveUp, Overloaded
from ddm.router.client import RouterClient
from ddm.router.server import RouterServer


def test_admits_queues_in_order_and_sheds_beyond_the_queue() -> None:
    a = Admission(max_active=1, max_waiting=2)
    a.acquire(None)
    order: list[int] = []

    def wait(i: int) -> None:
        a.acquire(time.monotonic() + 5)
        order.append(i)

    threads = []
    for i in range(2):
        threads.append(threading.Thread(target=wait, args=(i,)))
        threads[-1].start()
        while a.waiting < i + 1:
            time.sleep(0.005)
    with pytest.raises(
        Overloaded, match=r"1 samples running and 2 waiting \(max_concurrent 1, max_queue 2\)"
    ):
        a.acquire(None)
    a.release()  # waiter 0 goes first...
    threads[0].join(5)
    a.release()  # ...then waiter 1
    threads[1].join(5)
    assert order == [0, 1] and a.active == 1 and a.stats.shed == 1 and a.stats.admitted == 3


def test_a_waiter_whose_deadline_passes_gives_up_and_leaves_the_line() -> None:
    a = Admission(max_active=1, max_waiting=2)
    a.acquire(None)
    with pytest.raises(GaveUp):
        a.acquire(time.monotonic() + 0.1)
    with pytest.raises(GaveUp):
        a.acquire(None, is_active=lambda: False)  # the client went away
    assert a.waiting == 0 and a.stats.gave_up == 2
    a.release()
    a.acquire(time.monotonic() + 1)  # the line is empty again: admitted at once
    assert a.active == 1


def test_a_router_hit_by_more_clients_than_it_admits_sheds_the_rest(tmp_path: Path) -> None:
    experts = [
        ExpertServer(expert_checkpoint(tmp_path, k), max_delay=0.25).start(timeout=30) for k in range(2)
    ]
    router_checkpoint(tmp_path, 2)
    router = RouterServer(
        str(tmp_path / "router/checkpoints"),
        [e.target for e in experts],
        max_concurrent=1,
        max_queue=1,
        cohort_delay=0,
    ).start(timeout=30)
    try:
        with RouterClient(router.target) as client, ThreadPoolExecutor(5) as pool:

            def call(i: int) -> tuple[str, float]:
                time.sleep(0.05 * i)  # arrive in order, while the first is still sampling (>= 0.5 s)
                start = time.perf_counter()
                try:
                    client.sample(1, steps=2, strategy="full", timeout=20)
                    return "OK", time.perf_counter() - start
                except grpc.RpcError as e:
                    assert "router overloaded" in e.details(), e.details()
                    return e.code().name, time.perf_counter() - start

            results = list(pool.map(call, range(5)))
            assert client.sample(1, steps=1)[0].shape == (1, 1, 8, 8)  # and it serves on
        codes = [c for c, _ in results]
        assert codes == ["OK", "OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
        assert all(seconds < 0.2 for code, seconds in results if code != "OK")  # shed at once, not queued
        deadline = time.monotonic() + 5
        while router.admission.active and time.monotonic() < deadline:  # released as each call ends
            time.sleep(0.01)
        assert router.admission.stats.shed == 3 and router.admission.active == 0
    finally:
        router.stop(0)
        for e in experts:
            e.stop(0)
