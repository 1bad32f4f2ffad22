#!/bin/bash
# Build the node components of Kubernetes v1.20.2 -- kubelet, kube-scheduler, kube-controller-manager,
# kube-proxy -- from Debian bookworm's `kubernetes` source package, the same source the API server of
# ../shared/tools/kube-apiserver/build.sh comes from (vendored dependencies: only Go is needed), and
# install the Debian packages a node needs: containerd, runc, the CNI plugins, iptables, busybox-static
# and podman.
# usage: tests/kube_node_build.sh [WORKDIR]  -> prints WORKDIR on its last line (the binaries are in it)
# Needs root (apt-get). About 6 minutes on 2 cores on a cold cache; cached in WORKDIR.
set -euo pipefail
VERSION=1.20.2
W=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-node-$VERSION}
BINS="kubelet kube-scheduler kube-controller-manager kube-proxy"
PKGS="containerd runc containernetworking-plugins iptables busybox-static podman golang-go rsync"
missing=""
for p in $PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"; done
if [ -n "$missing" ]; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
done_all=1
for b in $BINS; do [ -x "$W/$b" ] || done_all=0; done
if [ $done_all = 1 ]; then echo "$W"; exit 0; fi
mkdir -p "$W"/apt/lists/partial "$W"/apt/parts "$W"/src
cd "$W"
SRC=$W/src/kubernetes-$VERSION
R2=""
if [ ! -e "$SRC/.go/src/k8s.io/kubernetes" ]; then  # else: an interrupted build's source, reused
  # A deb-src entry built from the machine's own Debian source list, kept under WORKDIR.
  sed -e 's/^Types: deb$/Types: deb deb-src/' /etc/apt/sources.list.d/debian.sources > apt/parts/src.sources
  APTO="-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$W/apt/parts -o Dir::State::Lists=$W/apt/lists"
  apt-get $APTO update -q >/dev/null
  cd src
  apt-get $APTO source --download-only kubernetes=1.20.5+really1.20.2-1.1+deb12u1 >/dev/null 2>&1
  tar xzf kubernetes_1.20.5+really1.20.2.orig.tar.gz
  cd "$SRC"
  # Go >= 1.18 with the vendored reflect2 1.0.1 crashes (SIGSEGV in map encoding); Debian's 1.0.2 fixes it.
  apt-get $APTO download golang-github-modern-go-reflect2-dev >/dev/null 2>&1
  R2=$(mktemp -d); dpkg-deb -x golang-github-modern-go-reflect2-dev_*.deb "$R2"
  rm -rf vendor/github.com/modern-go/reflect2 && mkdir vendor/github.com/modern-go/reflect2
  cp "$R2"/usr/share/gocode/src/github.com/modern-go/reflect2/*.{go,s} vendor/github.com/modern-go/reflect2/
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
fi
cd "$SRC"
cd .go/src/k8s.io/kubernetes
# providerless: without the in-tree cloud providers (AWS, Azure, GCE, vSphere SDKs), a third of the
# compile, which a test node never uses. kubelet needs cgo (as in Kubernetes' own release builds).
# The version is stamped into the vendored copy of component-base (a GOPATH build of the vendor tree).
PKG=k8s.io/kubernetes
for b in $BINS; do
  [ -x "$W/$b" ] && continue
  start=$(date +%s)
  GOPATH=$SRC/.go GO111MODULE=off HOME=$W/home GOCACHE=$W/gocache \
    go build -tags providerless -o "$W/$b.tmp" -ldflags "-X $PKG/vendor/k8s.io/component-base/version.gitVersion=v$VERSION" \
    "$PKG/cmd/$b" >>"$W/build.log" 2>&1
  mv "$W/$b.tmp" "$W/$b"
  echo "$b: $(($(date +%s) - start)) s" >>"$W/build-times.txt"
done
cd "$W" && rm -rf src gocache ${R2:+"$R2"}
echo "$W"
