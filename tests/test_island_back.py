"""A job that keeps failing (its island is down) is retried to its limit; the run reports which job failed
and why while the other jobs finish; once the island is back, running the coordinator again retries
it with a fresh budget and it finishes. Real TorchX local scheduler, real processes."""

from __future__ import annotations

import json
from pathlib import Path

from test_launcher import SUCCEED, launcher, script_job
from torchx.runner import get_runner

ISLAND = (  # fails while the island is "down" (no island-up file next to the job's output)
    "import os, sys; out = os.environ['OUT']\n"
    "if not os.path.exists(os.path.join(out, '..', 'island-up')):\n"
    "    print('island gpu-2 unreachable: connection refused', file=sys.stderr); sys.exit(5)\n"
    "open(os.path.join(out, 'done'), 'w').write('ok')"
)


def test_failed_job_is_reported_others_finish_and_a_rerun_continues_once_the_island_is_back(
    tmp_path: Path,
) -> None:
    for name in ("expert-0", "expert-1"):
        (tmp_path / "jobs" / name).mkdir(parents=True)
    jobs = [
        script_job("expert-0", str(tmp_path / "jobs" / "expert-0"), SUCCEED),
        script_job("expert-1", str(tmp_path / "jobs" / "expert-1"), ISLAND),
    ]
    with get_runner() as runner:
        first = launcher(tmp_path, runner, max_attempts=2).run(jobs)
    assert first["expert-0"].state == "SUCCEEDED"  # the others finish
    assert first["expert-1"].state == "FAILED" and first["expert-1"].attempts == 2  # retried to the limit
    assert "island gpu-2 unreachable" in first["expert-1"].error  # which expert, and why

    (tmp_path / "jobs" / "island-up").write_text("")  # the island is back
    with get_runner() as runner:
        second = launcher(tmp_path, runner, max_attempts=2).run(jobs)
    assert second["expert-1"].state == "SUCCEEDED" and second["expert-1"].attempts == 3
    assert second["expert-0"].state == "SUCCEEDED" and second["expert-0"].attempts == 1  # not relaunched
    saved = json.loads((tmp_path / "manifest.json").read_text())["jobs"]
    assert [a["state"] for a in saved["expert-1"]["attempts"]] == ["FAILED", "FAILED", "SUCCEEDED"]
