"""bench/chaos.py's checks after a run: the run's processes (found by an environment marker; what is
left is an orphan), the final weights' SHA-256, the manifest's consistency, partial files, and the
signs of faults in the logs. ``moto`` is the S3 server of an ``s3://`` root (``chaos_proxy.Moto``)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chaos_proxy import Moto


MARK = "DDM_CHAOS_TAG"  # every process of a chaos run inherits it: how orphans are found


def read_proc(path: str) -> bytes:
    """A /proc file's bytes; empty when the process is gone."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def marked(tag: str) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process carrying ``MARK=tag``."""
    needle = f"{MARK}={tag}".encode()
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        if needle not in read_proc(f"/proc/{name}/environ").split(b"\0"):
            continue
        stat = read_proc(f"/proc/{name}/stat")
        if not stat or stat.rsplit(b")", 1)[1].split()[0] == b"Z":
            continue
        out[int(name)] = (
            read_proc(f"/proc/{name}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        )
    return out


def parent(pid: int) -> int:
    stat = read_proc(f"/proc/{pid}/stat")
    return int(stat.rsplit(b")", 1)[1].split()[1]) if stat else 0


def children(pid: int) -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and parent(int(name)) == pid]


def zombie(pid: int) -> bool:
    stat = read_proc(f"/proc/{pid}/stat")
    return not stat or stat.rsplit(b")", 1)[1].split()[0] == b"Z"


def alive(pid: int) -> bool:
    return not zombie(pid)


def kill(pid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def filesystem(root: str, moto: Moto | None):
    if root.startswith("s3://"):
        import s3fs

        return s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": moto.endpoint}, skip_instance_cache=True
        ), root[5:]
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem(), root


def weights(root: str, moto: Moto | None) -> dict[str, str]:
    """ "<model>/<tensor>" -> SHA-256 of its bytes, over the final checkpoint of every expert, the router
    and the student, plus each checkpoint's step."""
    import torch
    from safetensors.torch import load as load_safetensors

    fs, base = filesystem(root, moto)
    out = {}
    for latest in sorted(fs.glob(f"{base}/**/checkpoints/latest.json")):
        model = latest[len(base) + 1 : -len("/checkpoints/latest.json")]
        pointer = json.loads(fs.cat_file(latest))
        out[f"{model}/step"] = str(pointer.get("step"))
        name = pointer.get("file") or pointer.get("path") or f"step-{int(pointer['step']):08d}.safetensors"
        tensors = load_safetensors(fs.cat_file(f"{latest.rsplit('/', 1)[0]}/{name.rsplit('/', 1)[-1]}"))
        for key, t in tensors.items():
            out[f"{model}/{key}"] = hashlib.sha256(
                t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            ).hexdigest()
    return out


def manifest_problems(root: str, moto: Moto | None) -> tuple[list[str], dict[str, list[str]]]:
    fs, base = filesystem(root, moto)
    m = json.loads(fs.cat_file(f"{base}/manifest.json"))
    problems = [f"stage {s}: {st.get('state')}" for s, st in m["stages"].items() if st.get("state") != "done"]
    from ddm.coordinator.pipeline import STAGES

    problems += [f"stage {s}: missing" for s in STAGES if s not in m["stages"]]
    attempts = {}
    for name, job in m["jobs"].items():
        attempts[name] = [a.get("state") for a in job["attempts"]]
        if job["state"] != "SUCCEEDED":
            problems.append(f"job {name}: {job['state']}")
        if not job["attempts"] or job["attempts"][-1].get("state") != "SUCCEEDED":
            problems.append(f"job {name}: last attempt {attempts[name][-1:] or 'none'}")
        problems += [
            f"job {name}: attempt {i + 1} left {s}"
            for i, s in enumerate(attempts[name][:-1])
            if s in ("SUBMITTED", "RUNNING")
        ]
    for name in ("expert-0", "expert-1", "router", "distill"):
        if name not in m["jobs"]:
            problems.append(f"job {name}: missing")
    return problems, attempts


def partial_files(root: str, moto: Moto | None) -> list[str]:
    """Temporary files, JSON that does not parse, safetensors whose header and size disagree."""
    fs, base = filesystem(root, moto)
    bad = []
    for path, info in fs.find(base, detail=True).items():
        rel = path[len(base) + 1 :]
        if rel.startswith("logs/"):
            continue
        if ".tmp" in rel.rsplit("/", 1)[-1]:
            bad.append(f"{rel} (temporary)")
        elif rel.endswith(".json"):
            try:
                json.loads(fs.cat_file(path))
            except ValueError:
                bad.append(f"{rel} (not valid JSON)")
        elif rel.endswith(".safetensors"):
            with fs.open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                try:
                    header = json.loads(f.read(n)) if 0 < n < 1 << 26 else None
                except ValueError:
                    header = None
            end = max(
                (v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__"), default=0
            )
            if header is None or 8 + n + end != info["size"]:
                bad.append(f"{rel} (truncated safetensors: {info['size']} bytes)")
    return bad


def files(root: str, moto: Moto | None) -> set[str]:
    """Every file under the root, relative, but the jobs' logs."""
    fs, base = filesystem(root, moto)
    return {p[len(base) + 1 :] for p in fs.find(base) if not p[len(base) + 1 :].startswith("logs/")}


def orphans(tag: str, grace: float = 30.0) -> dict[int, str]:
    """Processes of the run still alive ``grace`` seconds after it ended (then killed, by pid). 30 s:
    ``ddm serve run`` gives running calls 10 s (``--grace``) and then waits up to 10 s more per expert."""
    deadline = time.monotonic() + grace
    while (left := marked(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        kill(pid)
    return left


SIGNS = {  # what the logs show of each storage fault
    "ENOSPC": "No space left on device",
    "connection reset": "Connection reset",
    "connection closed": "ConnectionClosedError",
    "endpoint unreachable": "EndpointConnectionError",
    "read timeout": "Read timeout",
    "traceback": "Traceback (most recent call last)",
}


def errors_seen(paths: list[Path]) -> dict[str, int]:
    """How many lines of the coordinator's and the jobs' logs show each sign of a fault."""
    out: dict[str, int] = {}
    for path in paths:
        for p in [path] if path.is_file() else path.rglob("*") if path.is_dir() else []:
            if p.is_file():
                text = p.read_text(errors="replace")
                for sign, needle in SIGNS.items():
                    if n := text.count(needle):
                        out[sign] = out.get(sign, 0) + n
    return out
