"""Admission control for the router: a bounded number of Sample calls run, a bounded number wait.

Without a bound, every extra client adds to everyone's latency (each cohort step waits for every
other cohort's expert calls) until deadlines fail all of them at once. With ``max_active`` running and
``max_waiting`` queued (first come, first served), a call beyond both is shed at once with
RESOURCE_EXHAUSTED, so a client learns in a millisecond that it should back off or go to another
replica, and the latency of admitted calls stays bounded: at most ``max_waiting / max_active + 1``
service times (the load benchmark, ``bench/load.py``, measures it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class Overloaded(Exception):
    """Every running and waiting slot is taken (RESOURCE_EXHAUSTED)."""


class GaveUp(Exception):
    """The caller's deadline passed, or it left, while waiting for a slot."""


@dataclass
class AdmissionStats:
    admitted: int = 0
    shed: int = 0  # Overloaded
    gave_up: int = 0  # left or timed out while waiting
    most_waiting: int = 0


class Admission:
    """At most ``max_active`` holders and ``max_waiting`` waiters; see the module docstring."""

    def __init__(self, max_active: int, max_waiting: int):
        if max_active < 1 or max_waiting < 0:
            raise ValueError(f"max_active must be >= 1 and max_waiting >= 0, got {max_active}, {max_waiting}")
        self.max_active, self.max_waiting = max_active, max_waiting
        self.stats = AdmissionStats()
        self._cond = threading.Condition()
        self.active = 0
        self.waiting = 0
        self._next = 0  # ticket of the next waiter to admit (first come, first served)
        self._tickets = 0
        self._left: set[int] = set()  # tickets of waiters that gave up before their turn

    def acquire(self, deadline: float | None, is_active: Callable[[], bool] = lambda: True) -> None:
        """Take a slot, waiting in line if all are busy; :class:`Overloaded` when the line is full,
        :class:`GaveUp` when ``deadline`` (time.monotonic()) passes or ``is_active()`` turns false."""
        with self._cond:
            if self.active < self.max_active and self.waiting == 0:
                self.active += 1
                self.stats.admitted += 1
                return
            if self.waiting >= self.max_waiting:
                self.stats.shed += 1
                raise Overloaded(
                    f"{self.active} samples running and {self.waiting} waiting "
                    f"(max_concurrent {self.max_active}, max_queue {self.max_waiting}); retry later"
                )
            ticket = self._tickets
            self._tickets += 1
            self.waiting += 1
            self.stats.most_waiting = max(self.stats.most_waiting, self.waiting)
            try:
                while not (self._next == ticket and self.active < self.max_active):
                    left = None if deadline is None else deadline - time.monotonic()
                    if (left is not None and left <= 0) or not is_active():
                        self.stats.gave_up += 1
                        raise GaveUp("deadline passed or client left while waiting for a free slot")
                    self._cond.wait(0.1 if left is None else min(0.1, left))
            except GaveUp:
                self._skip(ticket)
                raise
            self.waiting -= 1
            self._next += 1
            self._skip_left()
            self.active += 1
            self.stats.admitted += 1
            self._cond.notify_all()

    def _skip(self, ticket: int) -> None:  # under the lock: a waiter left the line
        self.waiting -= 1
        self._left.add(ticket)
        self._skip_left()
        self._cond.notify_all()

    def _skip_left(self) -> None:  # under the lock
        while self._next in self._left:
            self._left.discard(self._next)
            self._next += 1

    def release(self) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()
