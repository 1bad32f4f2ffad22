"""Cohort scheduling (router/cohort.py) without a network: which requests are sampled together."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ddm.router.cohort import CohortScheduler, Member, cohort_deadline
from ddm.router.sample_request import SampleParams


def params(n: int, *, guidance: float = 3.0, sampler: str = "euler") -> SampleParams:
    return SampleParams(
        n, torch.zeros(n, dtype=torch.long), guidance, 4, sampler, "top-k", 1, 0.1, 0, 1.0, 0.5
    )


class Runs:
    def __init__(self) -> None:
        self.groups: list[list[int]] = []
        self.done = threading.Event()

    def __call__(self, members: list[Member]) -> None:
        self.groups.append([m.n for m in members])


def test_requests_arriving_together_with_one_schedule_share_a_cohort() -> None:
    runs = Runs()
    with ThreadPoolExecutor(4) as pool:
        s = CohortScheduler(runs, pool, gather=0.2, max_rows=10)
        for n in (1, 2, 3):
            s.join(Member(params(n), deadline=None))
        s.join(Member(params(2, guidance=1.0), deadline=None))  # another schedule: another cohort
        s.join(Member(params(1, sampler="stochastic"), deadline=None))  # its own noise stream: alone, at once
        time.sleep(0.05)
        assert runs.groups == [[1]]
        time.sleep(0.4)
    assert sorted(runs.groups) == [[1], [1, 2, 3], [2]] and (s.cohorts, s.members) == (3, 5)


def test_a_full_cohort_starts_at_once_and_the_next_request_opens_a_new_one() -> None:
    runs = Runs()
    with ThreadPoolExecutor(4) as pool:
        s = CohortScheduler(runs, pool, gather=5.0, max_rows=4)
        for n in (2, 2, 3):
            s.join(Member(params(n), deadline=None))
        time.sleep(0.05)
        assert runs.groups == [[2, 2]]  # 2 + 2 + 3 > 4: the first two went without waiting 5 s
    s2 = CohortScheduler(runs, ThreadPoolExecutor(1), gather=0.0, max_rows=4)
    s2.join(Member(params(1), deadline=None))
    time.sleep(0.05)
    assert runs.groups[-1] == [1]  # gather 0: every request alone


def test_cohort_deadline_is_the_latest_member_deadline() -> None:
    assert cohort_deadline([Member(params(1), deadline=5.0), Member(params(1), deadline=7.0)]) == 7.0
    assert cohort_deadline([Member(params(1), deadline=5.0), Member(params(1), deadline=None)]) is None


def test_the_last_member_to_leave_cancels_the_cohort() -> None:
    class Scope:
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    a, b = Member(params(1), deadline=None), Member(params(1), deadline=None)
    scope = Scope()
    for m in (a, b):
        m.cohort, m.scope = [a, b], scope
    a.leave()
    a.send("progress", 1)
    assert not scope.cancelled and a.events.empty()  # a left: no more events for it
    b.leave()
    assert scope.cancelled
