# Two commands do all set-up on a fresh machine:  `make demo` (the main job: `ddm run` on the embedded
# default config, or DEMO_CONFIG=path) and `make test`.
# Both bootstrap .venv themselves and install Debian's Fashion-MNIST if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_CONFIG ?=
PYTEST_ARGS ?=
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv dataset test-tools demo test test-fast lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/cpu.txt requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/cpu.txt
	# The EfficientNet-Lite network code; --no-deps because its metadata asks for an unpinned torch.
	$(PY) -m pip install --quiet --no-deps efficientnet-lite-pytorch==0.1.0
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

dataset: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: venv dataset
	$(VENV)/bin/ddm run $(DEMO_CONFIG)

# What the tests start for real: headless Chromium (the run report), etcd and the kube-apiserver
# (the k8s tests; built once from ../shared/tools' Debian source, then cached under ~/.cache), and a
# whole single-node cluster (tests/test_kube_node.py).
KUBE_BUILD := ../shared/tools/kube-apiserver/build.sh
test-tools:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	@command -v etcd >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq etcd-server; }
	@if [ -f $(KUBE_BUILD) ]; then bash $(KUBE_BUILD) >/dev/null; else echo "make: $(KUBE_BUILD) is missing: the k8s tests will fail"; fi
	@# The test Kubernetes node (tests/kube_node.py): kubelet, scheduler, controller-manager and
	@# kube-proxy from the same Debian source (about 6 minutes on 2 cores, cached under ~/.cache), and
	@# Debian's containerd, runc, CNI plugins, iptables, busybox-static and podman (apt).
	@$(SUDO) bash tests/kube_node_build.sh >/dev/null

test: venv dataset test-tools
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# ruff's lint rules and formatter (settings in pyproject.toml); CI runs it.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: venv dataset test-tools
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# Every benchmark in its quick mode; each prints one JSON object of figures as its last line.
bench: venv dataset
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/bench.txt
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
