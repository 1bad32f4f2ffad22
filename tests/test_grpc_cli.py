"""``ddm serve`` and ``ddm sample --router`` as real processes: two expert servers and a router on
ephemeral ports, a PNG grid sampled through them, and a graceful stop on SIGTERM."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from grpc_fixtures import expert_checkpoint, router_checkpoint

DDM = [sys.executable, "-m", "ddm.coordinator.cli"]


class Proc:
    """A subprocess whose stdout lines are collected by a thread (so a test can wait for one)."""

    def __init__(self, args: list[str]):
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.p.stdout], daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.p.kill()
                raise AssertionError(
                    f"no line matching {pattern!r}; stderr: {self.p.stderr.read()}"
                ) from None
            if m := re.search(pattern, line):
                return m

    def terminate(self) -> tuple[int, str]:
        self.p.send_signal(signal.SIGTERM)
        _, err = self.p.communicate(timeout=30)
        return self.p.returncode, err


@pytest.mark.slow  # four Python processes importing torch: ~20 s on 2 busy cores
def test_serve_and_sample_through_the_router_as_processes(tmp_path: Path) -> None:
    ckpts = [expert_checkpoint(tmp_path, k) for k in range(2)]
    router_checkpoint(tmp_path, 2)
    token = tmp_path / "token"
    token.write_text("cli-secret\n")
    procs: list[Proc] = []
    try:
        addresses = []
        for ckpt in ckpts:
            procs.append(
                Proc(
                    [
                        *DDM,
                        "serve",
                        "expert",
                        "--checkpoint",
                        ckpt,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "0",
                        "--threads",
                        "1",
                        "--token-file",
                        str(token),
                    ]
                )
            )
        for proc, k in zip(procs, range(2)):
            port = proc.wait_for(rf"ddm serve expert: serving expert-{k} on 127\.0\.0\.1:(\d+)").group(1)
            addresses += ["--expert", f"127.0.0.1:{port}"]
        router = Proc(
            [
                *DDM,
                "serve",
                "router",
                "--run",
                str(tmp_path),
                *addresses,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--token-file",
                str(token),
                "--steps",
                "3",
            ]
        )
        procs.append(router)
        port = router.wait_for(
            r"ddm serve router: serving router over 2 experts on 127\.0\.0\.1:(\d+)"
        ).group(1)
        out = tmp_path / "grid.png"
        sample = subprocess.run(
            [
                *DDM,
                "sample",
                "--router",
                f"127.0.0.1:{port}",
                "--n",
                "6",
                "--steps",
                "3",
                "--token-file",
                str(token),
                "--strategy",
                "full",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sample.returncode == 0, sample.stderr
        assert "wrote 6 samples" in sample.stdout and "expert-0" in sample.stdout
        assert "3/3" in sample.stderr  # the tqdm bar reached the last step
        with Image.open(out) as im:
            assert im.format == "PNG" and im.size[0] >= 3 * 8
        denied = subprocess.run(
            [*DDM, "sample", "--router", f"127.0.0.1:{port}", "--n", "1", "--out", str(tmp_path / "no.png")],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin"},
        )
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        for proc in reversed(procs):
            code, err = proc.terminate()
            assert code == 0 and "stopping (grace" in err, err
            assert "cli-secret" not in err  # tokens are never logged
    finally:
        for proc in procs:
            if proc.p.poll() is None:
                proc.p.kill()


def test_serve_reports_a_bad_checkpoint(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *DDM,
            "serve",
            "expert",
            "--checkpoint",
            str(tmp_path / "missing"),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "missing" in result.stderr and "no checkpoint found" in result.stderr
