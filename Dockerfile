# syntax=docker/dockerfile:1
# The ddm image: the `ddm` CLI (coordinator, expert/router trainers, servers) on Python 3.11.
#   CPU (default):  docker build -t ddm:dev .
#   CUDA:           docker build -t ddm:cuda \
#                     --build-arg BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
# Jobs and servers run as UID 10001 with a read-only root filesystem (k8s/ mounts /tmp); nothing
# secret is baked in: S3 credentials, tokens and TLS keys come from Kubernetes Secrets at run time.
ARG BASE=python:3.11-slim-bookworm

# --- runtime: the base plus a Python 3.11 (the CUDA bases have none) -------------------------------
FROM ${BASE} AS runtime
RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates && rm -rf /var/lib/apt/lists/*; \
    fi
# Debian's Fashion-MNIST for the demo run (only on Debian bases): --build-arg WITH_FASHION_MNIST=1
ARG WITH_FASHION_MNIST=0
RUN if [ "$WITH_FASHION_MNIST" = 1 ]; then \
      apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist \
      && rm -rf /var/lib/apt/lists/*; \
    fi

# --- build: a virtualenv with the pinned dependencies and ddm itself -------------------------------
FROM runtime AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/ requirements/
RUN pip install --extra-index-url "$TORCH_INDEX" -c requirements/constraints.txt -r requirements/cpu.txt \
 && pip install --no-deps efficientnet-lite-pytorch==0.1.0
COPY pyproject.toml README.md ./
COPY ddm/ ddm/
COPY core/ core/
COPY expert/ expert/
COPY router/ router/
COPY coordinator/ coordinator/
COPY proto/ proto/
RUN pip install --no-deps . && python -c "import ddm.coordinator.cli, ddm.proto.probe"

# --- final: runtime + the virtualenv, as an unprivileged user ---------------------------------------
FROM runtime
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
RUN groupadd --gid 10001 ddm && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp ddm
USER 10001:10001
WORKDIR /tmp
EXPOSE 50050 50051 9090
ENTRYPOINT ["ddm"]
CMD ["--help"]
