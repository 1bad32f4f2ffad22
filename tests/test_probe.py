"""`python -m ddm.proto.probe`, the exec probe of the k8s/ manifests, against a real expert server:
SERVING exits 0; a closed port, or TLS spoken wrongly, exits non-zero (so Kubernetes restarts or
unreadies the pod), with TLS and mutual TLS as the tls component configures them."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from grpc_fixtures import expert_checkpoint, self_signed

from ddm.expert.server import ExpertServer
from ddm.proto import probe
from ddm.proto.rpc import ServerTLS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return expert_checkpoint(tmp_path_factory.mktemp("run"), 0)


def test_probe_passes_on_a_serving_server_and_fails_on_a_closed_port(ckpt):
    server = ExpertServer(ckpt, address="127.0.0.1:0").start(timeout=30)
    try:
        assert probe.main([f"127.0.0.1:{server.port}"]) == 0
        assert probe.main([f"127.0.0.1:{server.port}", "--service", "ddm.v1.Expert"]) == 0
    finally:
        server.stop(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert probe.main([f"127.0.0.1:{closed}", "--timeout", "0.5"]) == 1


def test_probe_speaks_mutual_tls_like_the_tls_component(ckpt, tmp_path):
    cert, key = self_signed(tmp_path, "expert")
    tls = ServerTLS(str(cert), str(key), str(cert))  # clients must present a certificate from this CA
    server = ExpertServer(ckpt, address="127.0.0.1:0", tls=tls).start(timeout=30)
    try:
        flags = ["--server-name=localhost", f"--tls-ca={cert}", f"--tls-cert={cert}", f"--tls-key={key}"]
        assert probe.main([f"127.0.0.1:{server.port}", *flags]) == 0
        assert probe.main([f"127.0.0.1:{server.port}", "--timeout", "1"]) == 1  # plaintext against TLS
        # as the exec probe runs it: a fresh interpreter, cheap imports only
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ddm.proto.probe", f"127.0.0.1:{server.port}", *flags],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines()}
    finally:
        server.stop(0)
