"""Shared by the tests that stop a real training job: start ``python -m ddm.train``, wait until it has
logged two steps, then SIGTERM it (as a scheduler or Ctrl-C does) and collect how it ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ddm.core.metrics_log import read_rows

REPO = Path(__file__).resolve().parents[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "ddm.train", "--config", str(config), "--no-progress"]


def interrupt_training(
    config: Path, out: Path, *, group: bool = False, timeout: float = 120
) -> tuple[int, str]:
    """Run the job at ``config`` (writing to ``out``) until two metric rows exist, SIGTERM it (its whole
    process group with ``group``: the trainer and its data-loader workers) and return (exit code, stderr)."""
    proc = subprocess.Popen(train_command(config), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)  # fmt: skip
    stop = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    try:
        deadline = time.monotonic() + timeout
        while not (out / "metrics.csv").exists() or len(read_rows(str(out / "metrics.csv"))) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"training did not start within {timeout:.0f} s"
            time.sleep(0.1)
        stop(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            stop(signal.SIGKILL)
            proc.wait(10)
    return proc.returncode, err
