"""DynamicBatcher (expert/batching.py) without a network: what gets batched together, what is
dropped before compute, back-pressure, and a failing forward that must not kill the worker."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from ddm.expert.batching import DynamicBatcher, Expired, QueueFull


class Recorder:
    """fn(x, t, y) = x * 2 + t + y, recording each batch's row count; optionally blocks on a gate."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.batches: list[int] = []
        self.gate, self.fail = gate, fail

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(x.shape[0])
        if self.fail:
            raise RuntimeError("forward exploded")
        return x * 2 + (t + y)[:, None]


def rows(n: int, value: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.full((n, 3), value), torch.zeros(n), torch.full((n,), value)


def test_requests_queued_during_a_forward_share_the_next_one_and_get_their_own_rows() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    b = DynamicBatcher(fn, max_batch=8, max_delay=0.0, max_queue=16)
    first = b.submit(*rows(1, 0.0), deadline=None)
    time.sleep(0.1)  # the worker is now inside the forward of `first`, waiting on the gate
    reqs = [b.submit(*rows(n, float(i + 1)), deadline=None) for i, n in enumerate([3, 4, 2])]
    gate.set()
    outs = [b.wait(r, 5) for r in [first, *reqs]]
    assert fn.batches == [1, 7, 2]  # 3 + 4 fit in 8; the request of 2 would overflow and goes next
    for (n, v), out in zip([(1, 0.0), (3, 1.0), (4, 2.0), (2, 3.0)], outs):
        assert torch.equal(out, torch.full((n, 3), 3 * v))
    assert (b.stats.batches, b.stats.rows, b.stats.largest_batch) == (3, 10, 7)
    b.close()


def test_max_delay_gathers_requests_that_arrive_while_waiting() -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, max_batch=64, max_delay=0.3, max_queue=16)
    reqs = [b.submit(*rows(2, 1.0), deadline=None)]
    time.sleep(0.05)
    reqs.append(b.submit(*rows(2, 1.0), deadline=None))
    for r in reqs:
        b.wait(r, 5)
    assert fn.batches == [4]
    b.close()


def test_expired_and_cancelled_requests_are_dropped_before_compute() -> None:
    gate = threading.Event()
    fn = Recorder(gate)
    b = DynamicBatcher(fn, max_batch=8, max_delay=0.0, max_queue=16)
    busy = b.submit(*rows(1, 0.0), deadline=None)
    time.sleep(0.1)
    late = b.submit(*rows(2, 1.0), deadline=time.monotonic() + 0.05)
    gone = b.submit(*rows(2, 1.0), deadline=None)
    gone.cancel()
    live = b.submit(*rows(3, 1.0), deadline=None)
    time.sleep(0.1)
    gate.set()
    b.wait(busy, 5)
    with pytest.raises(Expired):
        b.wait(late, 5)
    with pytest.raises(Expired):
        b.wait(gone, 5)
    assert b.wait(live, 5).shape == (3, 3)
    assert fn.batches == [1, 3] and b.stats.expired == 2
    b.close()


def test_queue_full_and_oversized_requests() -> None:
    gate = threading.Event()
    b = DynamicBatcher(Recorder(gate), max_batch=4, max_delay=0.0, max_queue=2)
    a, c = b.submit(*rows(1, 0.0), deadline=None), b.submit(*rows(1, 0.0), deadline=None)
    with pytest.raises(QueueFull, match="2 requests pending"):
        b.submit(*rows(1, 0.0), deadline=None)
    with pytest.raises(ValueError, match="5 rows exceed max_batch 4"):
        b.submit(*rows(5, 0.0), deadline=None)
    gate.set()
    b.wait(a, 5), b.wait(c, 5)
    assert b.pending == 0 and b.stats.rejected == 1
    b.submit(*rows(1, 0.0), deadline=None)  # room again
    b.close()


def test_a_failing_forward_fails_its_requests_and_the_worker_goes_on() -> None:
    fn = Recorder(fail=True)
    b = DynamicBatcher(fn, max_batch=8, max_delay=0.0, max_queue=4)
    with pytest.raises(RuntimeError, match="forward exploded"):
        b.wait(b.submit(*rows(2, 1.0), deadline=None), 5)
    fn.fail = False
    assert b.wait(b.submit(*rows(2, 1.0), deadline=None), 5).shape == (2, 3)
    b.close()


def test_wait_times_out_and_close_fails_what_is_left() -> None:
    gate = threading.Event()
    b = DynamicBatcher(Recorder(gate), max_batch=1, max_delay=0.0, max_queue=4)
    first = b.submit(*rows(1, 0.0), deadline=None)
    queued = b.submit(*rows(1, 0.0), deadline=None)
    with pytest.raises(Expired, match="deadline passed while queued"):
        b.wait(queued, 0.05)
    closer = threading.Thread(target=b.close)
    closer.start()
    gate.set()
    closer.join(10)
    b.wait(first, 1)
    assert queued.done.is_set() and isinstance(queued.error, Expired)
    with pytest.raises(QueueFull, match="shutting down"):
        b.submit(*rows(1, 0.0), deadline=None)
