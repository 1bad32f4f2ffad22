"""bench/chaos.py's S3 side: moto's server on loopback, and a TCP proxy in front of it that resets or
stalls every connection on demand (the ``s3_drop`` and ``s3_stall`` faults)."""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from ddm.coordinator.stack import free_ports


class Moto:
    def __init__(self, work: Path):
        self.port = free_ports(1)[0]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(work / "moto.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"moto did not start: {(work / 'moto.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``upstream``: ``mode`` "pass", "drop" (reset every open and
    new connection) or "stall" (hold every connection open, forwarding nothing)."""

    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.mode = "pass"
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.resets = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            s.close()
        except OSError:
            pass

    def set_mode(self, mode: str) -> None:
        with self.lock:
            self.mode = mode
            if mode == "drop":
                for s in list(self.conns):
                    self._reset(s)
                    self.resets += 1
                self.conns.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.mode == "drop":
                self._reset(client)
                self.resets += 1
                continue
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                self._reset(client)
                continue
            with self.lock:
                self.conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while True:
                if self.mode == "stall":
                    time.sleep(0.05)
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self.lock:
                self.conns.discard(a)
                self.conns.discard(b)
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
