"""``bench/load.py --quick`` as CI runs it: router + two experts as processes on loopback, 24 clients in a
closed loop, far more than the router admits (4 running + 2 queued). Nothing may fail or go
unanswered, the overflow must be shed with RESOURCE_EXHAUSTED, the servers' memory must stay flat and
p99 latency within the bound the queue limits promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~25-35 s: three server processes, 2 s warm-up, 8 s of load
def test_load_quick_sheds_the_overflow_and_loses_nothing() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/load.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    keys = ("requests", "ok", "shed", "errors", "lost", "p50_ms", "p99_ms", "throughput_rps", "rss_growth_mb")
    assert set(keys) <= out.keys()
    assert out["errors"] == 0 and out["lost"] == 0, out
    assert out["ok"] > 0 and out["shed"] > 0, out  # overloaded on purpose: the overflow is shed, not queued
    assert out["requests"] == out["ok"] + out["shed"] + out["errors"] + out["lost"]
    assert out["p99_ms"] <= out["p99_bound_ms"], out
    assert out["rss_growth_mb"] <= 100 and out["servers_alive"], out


@pytest.mark.slow  # ~60-150 s: `ddm serve run` with two experts, each SIGKILLed and restarted once under load
def test_load_soak_short_restarts_experts_and_loses_nothing() -> None:
    """``bench/load.py --soak`` in short: the router's clients allow degradation, the chaos thread kills
    each expert once; every call is answered (ok, degraded or shed), no errors, both experts rejoin."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/load.py"), "--soak", "--seconds", "40", "--restart-every", "12",
         "--clients", "16", "--warmup", "1"],
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["errors"] == 0 and out["lost"] == 0, {k: out.get(k) for k in ("errors", "lost", "error_kinds")}
    assert out["kills"] >= 1 and out["failed_rejoins"] == 0 and out["restarts"] >= out["kills"], out
    assert out["requests"] == out["ok"] + out["shed"] + out["errors"] + out["lost"]
    assert out["degraded"] > 0 and out["not_serving_s"] > 0, out  # the kills were seen, and declared
    assert out["router_rss_growth_mb"] <= 50 and out["servers_alive"], out
