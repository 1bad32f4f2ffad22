"""``bench/chaos.py --quick`` as CI runs it: the tiny pipeline (every stage, the student included) on a
local root and on s3:// (moto on loopback, behind a proxy that drops and stalls connections), with a
seeded schedule of faults (the coordinator and trainers SIGKILLed, the disk full where a tmpfs can be
mounted, S3 connections reset or stalled, an expert server or the router SIGKILLed while two clients
sample). The operator's reruns and restarts must end in weights bit-identical to a fault-free run, a
consistent manifest, no partial file, no orphan process and no lost request; a killed expert server
must be restarted by ``ddm serve run``'s supervisor alone, with degraded answers meanwhile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # one reference run, two chaos runs side by side, two serving stacks restarted
@pytest.mark.timeout(900)
def test_chaos_quick_converges_to_the_fault_free_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/chaos.py"), "--quick", "--work", str(tmp_path / "chaos")],
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr[-3000:]
    out = json.loads(lines[-1])
    report = "\n".join(lines[-30:]) + "\n" + done.stderr[-2000:]
    assert out["runs"] == 2 and out["runs_identical"] == out["runs"], report
    assert out["manifests_consistent"] == out["runs"], report
    assert out["partial_files"] == 0 and out["orphans"] == 0 and out["lost_requests"] == 0, report
    assert out["jobs_run_twice"] == 0 and out["missing_files"] == 0 and out["sampling_identical"], report
    assert out["faults_injected"] >= 4, report  # the late ones may find the run already done
    assert {"kill_expert_server", "kill_router"} <= out["faults"].keys(), report
    assert out["requests"].get("OK", 0) > 0, report
    assert out["serve_problems"] == 0 and out["requests"].get("OK degraded", 0) > 0, report
    assert done.returncode == 0, report
