"""Stage and job timing for people: durations, ETAs, and the coordinator's own heartbeat.

``coordinator.json`` on the run root = {"host", "pid", "stage", "attempt_started_at", "time"}, rewritten
every few seconds while a stage runs. When a coordinator is killed, the next one reads it to count the
killed attempt's seconds up to its last sign of life (the manifest alone knows only when it started),
and ``ddm status`` shows how long ago the coordinator was last heard from.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from ddm.core import storage


def format_seconds(s: float | None) -> str:
    """``42 s``, ``6m 18s``, ``2h 05m``; ``-`` for None."""
    if s is None:
        return "-"
    s = max(0.0, float(s))
    if s < 100:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m"


def eta(step: int, steps: int, *, since: tuple[float, int], now: float) -> float | None:
    """Seconds left to reach ``steps`` at the rate seen from ``since`` = (time, step) to (now, step);
    None until the job has made progress."""
    t0, step0 = since
    if step >= steps:
        return 0.0
    if step <= step0 or now <= t0:
        return None
    return (steps - step) * (now - t0) / (step - step0)


def read_clock(url: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(url) if storage.exists(url) else None
    except ValueError:
        return None


class Clock:
    """Writes ``coordinator.json`` for one attempt at a stage: at start and every ``every`` seconds
    from a daemon thread, until ``stop``. ``last_alive`` is what the previous coordinator left there."""

    def __init__(self, url: str, stage: str, *, every: float = 10.0):
        self.url, self.stage, self.every = url, stage, every
        self.last_alive = read_clock(url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._last = 0.0

    def tick(self, at_most_every: float = 2.0) -> None:
        """A beat unless one was written in the last ``at_most_every`` seconds (the launcher's polls)."""
        if time.time() - self._last >= at_most_every:
            self.beat()

    def beat(self) -> None:
        self._last = time.time()
        try:
            storage.write_json(self.url, {"host": socket.gethostname(), "pid": os.getpid(), "stage": self.stage,
                                          "attempt_started_at": self._started, "time": time.time()})  # fmt: skip
        except Exception:  # noqa: BLE001  a missed beat only makes a killed attempt's time shorter
            pass

    def start(self, attempt_started_at: float) -> None:
        self._started = attempt_started_at
        self.beat()
        self._thread = threading.Thread(target=self._loop, name=f"ddm-clock-{self.stage}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.beat()
