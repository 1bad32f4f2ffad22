"""A real S3 endpoint for the tests: moto's server in its own process on 127.0.0.1, fake credentials
and the region in the environment (as a user's AWS chain would give them), one fresh bucket per test.

The endpoint reaches s3fs/botocore through ``AWS_ENDPOINT_URL_S3`` (what ``storage.configure`` and
``[storage] endpoint_url`` set), never through client keyword arguments, so the tests exercise the same
path a deployment uses. Test modules import ``moto_endpoint_fixture`` and ``s3_fixture``, which
register the fixtures ``moto_endpoint`` and ``s3``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

REGION = "us-east-1"
# Variables that would point botocore somewhere else than the test endpoint (a developer's profile, a
# real session token, a configured endpoint).
_FOREIGN = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_REGION", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, endpoint: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return True
        except OSError:
            time.sleep(0.1)
    return False


@pytest.fixture(scope="session", name="moto_endpoint")
def moto_endpoint_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``moto_server`` (moto[server]) as a subprocess on a free loopback port, for the whole session."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.fail("moto[server] is missing: pip install -c requirements/constraints.txt 'moto[server]'")
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    for _ in range(3):  # the free port may be taken between choosing it and moto binding it
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                    stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        if _wait_ready(proc, endpoint, timeout=60):
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"moto_server did not start: {log_path.read_text()[-2000:]}")
    try:
        yield endpoint
    finally:
        forget_s3_clients()  # s3fs caches its clients (endpoint included) across tests: drop them with the server
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class S3:
    endpoint: str
    bucket: str
    _client: object = None

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])

    def client(self):  # a boto3 S3 client on the test endpoint (found through the environment)
        if self._client is None:
            import boto3

            self._client = boto3.client("s3")  # made once: a client takes ~0.3 s to build
        return self._client

    def objects(self, prefix: str = "") -> dict[str, dict]:
        """key -> {"ETag", "Size"} of every object under ``prefix``."""
        out: dict[str, dict] = {}
        for page in (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        ):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = {"ETag": obj["ETag"], "Size": obj["Size"]}
        return out


def forget_s3_clients() -> None:
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()


@pytest.fixture(name="s3")
def s3_fixture(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[S3]:
    """A fresh bucket on the moto endpoint, reached through the standard AWS environment variables."""
    for name in _FOREIGN:
        monkeypatch.delenv(name, raising=False)
    nowhere = tmp_path_factory.mktemp("aws") / "none"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere))  # no developer profile can leak in
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    store = S3(moto_endpoint, f"ddm-{uuid.uuid4().hex[:12]}")
    store.client().create_bucket(Bucket=store.bucket)
    yield store


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current (test-patched) environment for a child process, plus ``extra``."""
    return {**os.environ, **extra}
