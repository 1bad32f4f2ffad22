"""Run a ``ddm`` command in a fresh interpreter and report which heavy libraries it loaded: the
commands that only read a run root (``--help``, ``status``, ``logs``) must answer without them."""

import json
import subprocess
import sys

HEAVY = ("torch", "grpc", "faiss", "numpy", "safetensors.torch")

_PROBE = (
    "import json, sys\nfrom ddm.coordinator.cli import main\nrc = main(sys.argv[1:])\nsys.stdout.flush()\n"
    f"print('\\nLOADED ' + json.dumps([rc, sorted(m for m in {HEAVY!r} if m in sys.modules)]))"
)


def ddm_fresh(*args: str) -> tuple[str, list[str]]:
    """``ddm ARGS`` in a new interpreter, which must succeed: its stdout, and the heavy modules it loaded."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120)
    out, _, tail = done.stdout.rpartition("\nLOADED ")
    assert done.returncode == 0 and tail, done.stdout + done.stderr
    rc, loaded = json.loads(tail)
    assert rc == 0, done.stdout + done.stderr
    return out, loaded
