"""Host state a test Kubernetes node changes, recorded before it starts and restored after it stops.

kubelet, kube-proxy, containerd and the CNI plugins set sysctls, add iptables chains (KUBE-*, CNI-*),
make cgroups (kubepods), mount overlays, shm and network namespaces, create a bridge and leave
directories at fixed paths (/var/log/pods, /run/netns, /var/lib/cni, ...). ``HostState.record()``
notes what is there before; ``restore()`` undoes everything the node added and returns what it could
not undo (an empty list when the host is as it was).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# Set by kubelet (kernel.*, vm.*), kube-proxy (route_localnet, conntrack) and CNI's bridge (ip_forward).
SYSCTLS = (
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
# Fixed paths the node components create whatever their configured directories are.
FIXED_PATHS = (
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/var/lib/containerd",
    "/var/lib/dockershim",
    "/run/containerd",
    "/run/netns",
    "/var/run/netns",
    "/etc/cni",
    "/opt/cni",
)
CHAIN_PREFIXES = ("KUBE-", "CNI-")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: str) -> str | None:
    try:
        return Path("/proc/sys", path).read_text().strip()
    except OSError:
        return None


def _mountpoints() -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        out.append(point)
    return out


def _cgroup_dirs() -> set[str]:
    """The top-level cgroups of every v1 controller (and the unified hierarchy) and everything under
    kubelet's ``kubepods`` (other processes' cgroups deeper down are none of the node's business)."""
    dirs: set[str] = set()
    if not CGROUP_ROOT.is_dir():
        return dirs
    for controller in CGROUP_ROOT.iterdir():
        try:
            top = [e for e in os.scandir(controller) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for entry in top:
            dirs.add(entry.path)
            if entry.name.startswith("kubepods"):
                for root, subdirs, _ in os.walk(entry.path):
                    dirs.update(os.path.join(root, d) for d in subdirs)
    return dirs


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _addrs() -> set[tuple[str, str]]:
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
    return {(line.split()[1], line.split()[3]) for line in out.splitlines() if len(line.split()) > 3}


def _chains(tool: str) -> dict[str, set[str]]:
    """table -> chains named KUBE-*/CNI-* (``iptables-save``'s view)."""
    r = subprocess.run([f"{tool}-save"], capture_output=True, text=True)
    chains: dict[str, set[str]] = {}
    table = ""
    for line in r.stdout.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name.startswith(CHAIN_PREFIXES):
                chains.setdefault(table, set()).add(name)
    return chains


def _remove_chains(tool: str, keep: dict[str, set[str]]) -> None:
    """Delete the rules that jump to KUBE-*/CNI-* chains the node made, then those chains."""
    for table, chains in _chains(tool).items():
        mine = chains - keep.get(table, set())
        if not mine:
            continue
        rules = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True).stdout
        for line in rules.splitlines():
            parts = line.split()
            if line.startswith("-A ") and "-j" in parts and parts[parts.index("-j") + 1] in mine:
                if parts[1] not in mine:  # a jump from a chain we keep: delete that one rule
                    subprocess.run([tool, "-t", table, "-D", *parts[1:]], capture_output=True)
        for chain in mine:
            subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
        for chain in mine:
            subprocess.run([tool, "-t", table, "-X", chain], capture_output=True)


@dataclass
class HostState:
    sysctls: dict[str, str | None] = field(default_factory=dict)
    paths: set[str] = field(default_factory=set)
    mounts: set[str] = field(default_factory=set)
    cgroups: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)
    addrs: set[tuple[str, str]] = field(default_factory=set)
    chains: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    @classmethod
    def record(cls) -> HostState:
        return cls(
            sysctls={k: _read(k) for k in SYSCTLS},
            paths={p for p in FIXED_PATHS if os.path.lexists(p)},
            mounts=set(_mountpoints()),
            cgroups=_cgroup_dirs(),
            links=_links(),
            addrs=_addrs(),
            chains={t: _chains(t) for t in ("iptables", "ip6tables") if shutil.which(t)},
        )

    def restore(self, workdir: Path) -> list[str]:
        """Undo what the node added; returns what is still different (empty: restored)."""
        left: list[str] = []
        # Mounts: the deepest first, lazily (a dead container's overlay may still be busy a moment).
        for point in sorted(set(_mountpoints()) - self.mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        for link in _links() - self.links:
            subprocess.run(["ip", "link", "delete", link], capture_output=True)
        for dev, cidr in _addrs() - self.addrs:
            subprocess.run(["ip", "addr", "del", cidr, "dev", dev], capture_output=True)
        for tool, keep in self.chains.items():
            _remove_chains(tool, keep)
        for cg in sorted(_cgroup_dirs() - self.cgroups, key=len, reverse=True):
            try:
                os.rmdir(cg)
            except OSError as e:
                left.append(f"cgroup {cg}: {e.strerror}")
        for key, value in self.sysctls.items():
            if value is not None and _read(key) != value:
                try:
                    Path("/proc/sys", key).write_text(value + "\n")
                except OSError as e:
                    left.append(f"sysctl {key}: {e.strerror}")
        for path in FIXED_PATHS:
            if path not in self.paths and os.path.lexists(path):
                if os.path.islink(path) or not os.path.isdir(path):
                    os.unlink(path)
                else:
                    shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
        left += self.differences()
        return left

    def differences(self) -> list[str]:
        now = HostState.record()
        out = [
            f"sysctl {k} = {now.sysctls[k]} (was {v})" for k, v in self.sysctls.items() if now.sysctls[k] != v
        ]
        out += [f"path {p} left" for p in sorted(now.paths - self.paths)]
        out += [f"mount {m} left" for m in sorted(now.mounts - self.mounts)]
        out += [f"cgroup {c} left" for c in sorted(now.cgroups - self.cgroups)]
        out += [f"link {lk} left" for lk in sorted(now.links - self.links)]
        out += [f"address {a} on {d} left" for d, a in sorted(now.addrs - self.addrs)]
        for tool, tables in now.chains.items():
            for table, chains in tables.items():
                extra = chains - self.chains.get(tool, {}).get(table, set())
                out += [f"{tool} -t {table} chain {c} left" for c in sorted(extra)]
        return out
