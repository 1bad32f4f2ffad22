"""Container images for the test node without a registry or a builder: an OCI image archive written
directly (one layer: Debian's static busybox and its applet links), which ``ctr images import`` loads
into containerd's k8s.io namespace. The node's pause image is one (its entry point sleeps), and test
pods run the same image with a shell command."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "echo", "cat", "ls", "kill", "true", "false", "wget", "nc", "env", "hostname", "id")


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def busybox_layer() -> bytes:
    """An uncompressed layer tar: /bin/busybox, its applets as symlinks, /tmp, /etc/passwd."""
    if not BUSYBOX.exists():
        raise RuntimeError(
            f"{BUSYBOX} missing: `apt-get install busybox-static` (tests/kube_node_build.sh does)"
        )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d, mode in (("bin", 0o755), ("tmp", 0o1777), ("etc", 0o755)):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
            tar.addfile(info)
        _add(tar, "bin/busybox", BUSYBOX.read_bytes(), 0o755)
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
            tar.addfile(info)
        _add(tar, "etc/passwd", b"root:x:0:0:root:/:/bin/sh\nddm:x:10001:10001:ddm:/tmp:/bin/sh\n")
        _add(tar, "etc/group", b"root:x:0:\nddm:x:10001:\n")
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    _add(tar, f"blobs/sha256/{digest}", data)
    return f"sha256:{digest}"


def oci_archive(path: Path, name: str, entrypoint: list[str], layer: bytes | None = None) -> Path:
    """Write an OCI image archive of one layer named ``name`` (e.g. ``docker.io/ddm/busybox:test``)."""
    layer = busybox_layer() if layer is None else layer
    diff_id = f"sha256:{hashlib.sha256(layer).hexdigest()}"
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    with tarfile.open(path, "w") as tar:
        _add(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        config_bytes = json.dumps(config).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": _blob(tar, config_bytes), "size": len(config_bytes)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": _blob(tar, layer), "size": len(layer)}],
        }  # fmt: skip
        manifest_bytes = json.dumps(manifest).encode()
        index = {
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _blob(tar, manifest_bytes), "size": len(manifest_bytes),
                "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
            }],
        }  # fmt: skip
        _add(tar, "index.json", json.dumps(index).encode())
    return path
