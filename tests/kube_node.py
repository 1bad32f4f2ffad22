"""A real single-node Kubernetes (v1.20.2) for the slow tests: etcd and the API server (k8s_helpers'
``KubeAPIServer``), containerd with runc and a CNI bridge, kubelet, kube-scheduler,
kube-controller-manager and kube-proxy, all on this machine. Pods really run.

The node components are built once by ``tests/kube_node_build.sh`` (cached under ~/.cache, like the
API server; ``make test-tools`` runs it); containerd, runc, the CNI plugins, iptables and busybox come
from Debian. No registry: the pause image and the test image are OCI archives written by
tests/kube_node_image.py and imported into containerd; pods use ``imagePullPolicy: Never``.

``KubeNode.start()`` raises ``NodeUnavailable`` naming exactly what is missing or what failed (the
fixture turns it into a test failure, never a skip). ``stop()`` ends every process by its pid, kills
the containers, and restores the host (``kube_node_host.HostState``): mounts, the bridge, iptables
chains, cgroups, sysctls and the fixed directories. It returns what it could not restore.

Sandbox settings (../shared/tools/kube-node/README.md): no CAP_SYS_RESOURCE, hence containerd's
``restrict_oom_score_adj``; cgroup v1 with the cgroupfs driver; kubelet with ``failSwapOn: false``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml
from k8s_helpers import ADMIN_TOKEN, KubeAPIServer, free_port
from kube_node_host import HostState
from kube_node_image import oci_archive

VERSION = "1.20.2"
BUILD_SCRIPT = "tests/kube_node_build.sh"
NODE_NAME = "ddm-test-node"
POD_CIDR = "10.244.0.0/24"
BRIDGE = "ddmcni0"
# kubelet refuses a loopback node IP (127/8), and its API (anonymous, AlwaysAllow) must not face a
# network: the node's address is an extra address on lo (this sandbox has no dummy links).
NODE_IP = "10.245.0.1"
PAUSE_IMAGE = "docker.io/ddm/pause:test"
TEST_IMAGE = "docker.io/ddm/busybox:test"
COMPONENTS = ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy")
DEBIAN = {"containerd": "containerd", "runc": "runc", "ctr": "containerd", "iptables": "iptables",
          "/usr/lib/cni/bridge": "containernetworking-plugins", "/bin/busybox": "busybox-static"}  # fmt: skip


class NodeUnavailable(RuntimeError):
    """This machine cannot run the test node; the message says why and what to do."""


def node_binaries() -> Path:
    explicit = os.environ.get("DDM_KUBE_NODE_DIR")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    d = Path(explicit) if explicit else cache / f"kube-node-{VERSION}"
    missing = [b for b in COMPONENTS if not (d / b).exists()]
    if missing:
        raise NodeUnavailable(
            f"no {', '.join(missing)} in {d}: build them once with `bash {BUILD_SCRIPT}` (about 6 minutes, "
            "cached; `make test-tools` does it), or set DDM_KUBE_NODE_DIR"
        )
    return d


def check_host() -> None:
    """Everything the node needs from the machine, checked before anything starts."""
    if os.geteuid() != 0:
        raise NodeUnavailable("the test node needs root (kubelet, containerd, network namespaces, iptables)")
    absent = {pkg for tool, pkg in DEBIAN.items() if not (Path(tool).exists() or shutil.which(tool))}
    if absent:
        raise NodeUnavailable(f"missing Debian packages: apt-get install {' '.join(sorted(absent))}")
    if not Path("/sys/fs/cgroup/memory").is_dir() or not os.access("/sys/fs/cgroup/memory", os.W_OK):
        raise NodeUnavailable(
            "kubelet's cgroupfs driver needs a writable cgroup v1 hierarchy at /sys/fs/cgroup"
        )
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode == 0:
        raise NodeUnavailable(f"bridge {BRIDGE} exists: another test node runs here (or was not torn down)")
    if (
        NODE_IP
        in subprocess.run(["ip", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    ):
        raise NodeUnavailable(
            f"{NODE_IP} is on lo already: another test node runs here (or was not torn down)"
        )
    for port in (10250, 10248):  # kubelet's fixed ports
        import socket

        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise NodeUnavailable(f"127.0.0.1:{port} is taken: another kubelet runs on this machine")


class KubeNode:
    """API server + node components + containerd; ``kubectl`` as admin."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.api = KubeAPIServer(
            workdir / "api", extra_args=("--kubelet-preferred-address-types=InternalIP",)
        )
        self.procs: dict[str, subprocess.Popen] = {}
        self.host: HostState | None = None
        self.timings: dict[str, float] = {}

    # --- start ------------------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> KubeNode:
        t0 = time.monotonic()
        bins = node_binaries()
        check_host()
        self.host = HostState.record()
        try:
            (self.dir / "api").mkdir(parents=True, exist_ok=True)
            self.api.start(timeout=300)
            self.timings["apiserver_s"] = time.monotonic() - t0
            self.kubeconfig = self.api.admin_kubeconfig
            self._node_link()
            self._containerd()
            self._images()
            self._start("kubelet", [str(bins / "kubelet"), *self._kubelet_args()])
            self._start("kube-proxy", [str(bins / "kube-proxy"), *self._proxy_args()])
            self._start("kube-scheduler", [str(bins / "kube-scheduler"), f"--kubeconfig={self.kubeconfig}",
                        "--leader-elect=false", "--port=0", "--secure-port=0"])  # fmt: skip
            self._start("kube-controller-manager", [
                str(bins / "kube-controller-manager"), f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
                "--port=0", "--secure-port=0", f"--service-account-private-key-file={self.api.dir / 'sa.key'}",
                f"--root-ca-file={self.api.dir / 'certs' / 'apiserver.crt'}", "--use-service-account-credentials=false",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-route,-service", "--node-monitor-grace-period=20s",
            ])  # fmt: skip
            self._wait_ready(t0 + timeout)
            self.timings["ready_s"] = time.monotonic() - t0
        except BaseException:
            left = self.stop()
            if left:
                raise NodeUnavailable(f"the node failed to start and left: {left}") from None
            raise
        return self

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.dir / f"{name}.log").read_text().splitlines()[-15:]
                raise NodeUnavailable(
                    f"{name} exited ({p.returncode}); last lines of its log:\n" + "\n".join(tail)
                )

    def _containerd(self) -> None:
        d = self.dir / "containerd"
        (self.dir / "cni" / "net.d").mkdir(parents=True)
        (self.dir / "cni" / "net.d" / "10-ddm.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "ddm-test",
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": str(self.dir / "cni" / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }))  # fmt: skip
        self.containerd_sock = d / "containerd.sock"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (self.dir / "containerd.toml").write_text(f"""version = 2
root = "{d / "root"}"
state = "{d / "state"}"
[grpc]
  address = "{self.containerd_sock}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{d / "runc"}"
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{self.dir / "cni" / "net.d"}"
""")
        self._start("containerd", ["containerd", "--config", str(self.dir / "containerd.toml")])
        deadline = time.monotonic() + 30
        while not self.ctr("version", check=False).returncode == 0:
            self._check_alive()
            if time.monotonic() > deadline:
                raise NodeUnavailable(f"containerd not answering on {self.containerd_sock} after 30 s")
            time.sleep(0.2)

    def _node_link(self) -> None:
        r = subprocess.run(
            ["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise NodeUnavailable(f"cannot put the node's address {NODE_IP} on lo: {r.stderr.strip()}")

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(["ctr", "--address", str(self.containerd_sock), "-n", "k8s.io", *args],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        if check and r.returncode != 0:
            raise NodeUnavailable(f"ctr {' '.join(args)} failed: {r.stderr.strip()}")
        return r

    def load_image(self, archive: Path) -> None:
        """Import an OCI/docker archive into the node's containerd (pods: imagePullPolicy Never)."""
        self.ctr("images", "import", "--no-unpack=false", str(archive))

    def _images(self) -> None:
        t = time.monotonic()
        self.load_image(oci_archive(self.dir / "pause.tar", PAUSE_IMAGE, ["/bin/sleep", "2147483647"]))
        self.load_image(oci_archive(self.dir / "busybox.tar", TEST_IMAGE, ["/bin/sh"]))
        self.timings["images_s"] = time.monotonic() - t

    def _kubelet_args(self) -> list[str]:
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "healthzBindAddress": "127.0.0.1", "readOnlyPort": 0,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs", "failSwapOn": False, "podCIDR": POD_CIDR,
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "registryPullQPS": 0, "syncFrequency": "5s",
            "fileCheckFrequency": "5s", "nodeStatusUpdateFrequency": "4s", "maxPods": 30,
            "staticPodPath": "", "resolvConf": "/etc/resolv.conf",
        }  # fmt: skip
        (self.dir / "kubelet.yaml").write_text(yaml.safe_dump(config))
        return [
            f"--config={self.dir / 'kubelet.yaml'}", f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={self.dir / 'kubelet'}", f"--cert-dir={self.dir / 'kubelet' / 'pki'}",
            "--container-runtime=remote", f"--container-runtime-endpoint=unix://{self.containerd_sock}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1",
        ]  # fmt: skip

    def _proxy_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}", "--proxy-mode=iptables", f"--hostname-override={NODE_NAME}",
            f"--bind-address={NODE_IP}", f"--cluster-cidr={POD_CIDR}", "--conntrack-max-per-core=0",
            f"--metrics-bind-address=127.0.0.1:{free_port()}", f"--healthz-bind-address=127.0.0.1:{free_port()}",
        ]  # fmt: skip

    def _wait_ready(self, deadline: float) -> None:
        while True:
            self._check_alive()
            r = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
            if r.returncode == 0:
                node = json.loads(r.stdout)
                ready = [c for c in node["status"].get("conditions", []) if c["type"] == "Ready"]
                if ready and ready[0]["status"] == "True":
                    return
            if time.monotonic() > deadline:
                why = ready[0].get("message") if r.returncode == 0 and ready else r.stderr.strip()
                raise NodeUnavailable(f"node {NODE_NAME} not Ready in time ({why}); logs in {self.dir}")
            time.sleep(1)

    # --- use --------------------------------------------------------------------------------------
    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        return self.api.kubectl(*args, stdin=stdin, check=check)

    def token(self) -> str:
        return ADMIN_TOKEN

    # --- stop -------------------------------------------------------------------------------------
    def _kill_containers(self) -> None:
        runc_root = self.dir / "containerd" / "runc" / "k8s.io"
        if not runc_root.is_dir():
            return
        listed = subprocess.run(
            ["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True
        )
        for cid in listed.stdout.split():
            subprocess.run(
                ["runc", "--root", str(runc_root), "kill", "--all", cid, "KILL"], capture_output=True
            )
            subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", cid], capture_output=True)

    def _shim_pids(self) -> list[int]:
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                cmd
                and cmd[0].endswith(b"containerd-shim-runc-v2")
                and str(self.containerd_sock).encode() in cmd
            ):
                pids.append(int(p.name))
        return pids

    def stop(self) -> list[str]:
        """Stop everything and restore the host; returns what could not be restored (empty: all)."""
        order = ["kube-controller-manager", "kube-scheduler", "kube-proxy", "kubelet"]
        for name in order:
            self._end(name)
        self._kill_containers()
        for pid in self._shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._end("containerd")
        proxy = node_binaries_or_none()
        if proxy is not None:  # kube-proxy's own clean-up of its iptables rules, then ours (HostState)
            subprocess.run([str(proxy / "kube-proxy"), "--cleanup"], capture_output=True, timeout=60)
        self.api.stop()
        left = self.host.restore(self.dir) if self.host is not None else []
        self.host = None
        return left

    def _end(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def node_binaries_or_none() -> Path | None:
    try:
        return node_binaries()
    except NodeUnavailable:
        return None
