"""``ddm serve`` and ``ddm sample --router`` as real processes: two expert servers and a router on
ephemeral ports, a PNG grid sampled through them, and a graceful stop on SIGTERM."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc_fixtures import expert_checkpoint, router_checkpoint
from PIL import Image

from ddm.coordinator.stack import ServerProcess

DDM = [sys.executable, "-m", "ddm.coordinator.cli"]


class Proc(ServerProcess):
    """A ``ddm`` subprocess on the stack's one helper: stdout lines queued (a test waits for one), every
    stderr line kept (read while it runs, so a chatty server never blocks on a full pipe)."""

    def __init__(self, args: list[str]):
        super().__init__("ddm", args, keep=100_000)
        self.start()

    @property
    def p(self) -> subprocess.Popen:
        return self.proc

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_tail)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.p.kill()
                self.wait(10)
                raise AssertionError(f"no line matching {pattern!r}; stderr: {self.stderr}") from None
            if m := re.search(pattern, line):
                return m

    def terminate(self) -> tuple[int, str]:
        self.p.send_signal(signal.SIGTERM)
        return self.wait(30), self.stderr


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


@pytest.mark.slow  # four `ddm sample` processes importing torch: ~30 s on 2 busy cores
def test_sample_run_in_process_matches_the_router_and_allow_degraded_survives_a_lost_expert(
    tmp_path: Path,
) -> None:
    """``ddm sample --run ROOT`` (new) samples the run's ensemble in this process and draws what the
    router serves for the same seed; ``--allow-degraded`` (new, the client had it) finishes without a
    lost expert and names it, where the default fails with UNAVAILABLE."""
    import numpy as np
    from test_serve_stack import make_run

    from ddm.expert.server import ExpertServer
    from ddm.router.client import RouterClient
    from ddm.router.server import RouterServer

    root = tmp_path / "run"
    make_run(root)
    experts = [
        ExpertServer(str(root / f"experts/expert-{k}/checkpoints")).start(timeout=30) for k in range(2)
    ]
    router = RouterServer(str(root / "router/checkpoints"), [e.target for e in experts], health_interval=0.1)
    router.start(timeout=30)
    common = ["--n", "4", "--steps", "3", "--seed", "5", "--strategy", "full", "--labels", "0,1,2"]

    def sample(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*DDM, "sample", *common, *args], capture_output=True, text=True, timeout=120, check=False
        )

    try:
        served = sample("--router", router.target, "--out", str(tmp_path / "served.png"))
        local = sample("--run", str(root), "--out", str(tmp_path / "local.png"))
        assert served.returncode == 0 and local.returncode == 0, served.stderr + local.stderr
        assert "in-process ensemble of 2 experts" in local.stdout and "expert-1" in local.stdout
        with Image.open(tmp_path / "served.png") as a, Image.open(tmp_path / "local.png") as b:
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
        assert diff.max() <= 1  # the same images; float rounding may flip a level

        experts[1].stop(0)
        with RouterClient(router.target) as client:
            deadline = time.monotonic() + 10
            while client.health() != (False, "NOT_SERVING") and time.monotonic() < deadline:
                time.sleep(0.05)
        strict = sample("--router", router.target, "--out", str(tmp_path / "strict.png"))
        assert strict.returncode == 1 and "UNAVAILABLE" in strict.stderr and "expert-1" in strict.stderr, (
            strict.stderr
        )
        assert "Traceback" not in strict.stderr
        degraded = sample(
            "--router", router.target, "--allow-degraded", "--out", str(tmp_path / "degraded.png")
        )
        assert degraded.returncode == 0, degraded.stderr
        assert "degraded, without expert-1" in degraded.stdout, degraded.stdout
        misused = sample("--run", str(root), "--allow-degraded", "--out", str(tmp_path / "x.png"))
        assert misused.returncode == 2 and "--allow-degraded applies to --router only" in misused.stderr
        assert "Traceback" not in misused.stderr
    finally:
        router.stop(0)
        for e in experts:
            e.stop(0)


def test_sample_checkpoint_of_a_run_root_points_to_run(tmp_path: Path) -> None:
    from test_serve_stack import make_run

    make_run(tmp_path / "run")
    out = subprocess.run([*DDM, "sample", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 2 and "is a run root; sample its ensemble with --run" in out.stderr, out.stderr
