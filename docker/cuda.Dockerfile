# syntax=docker/dockerfile:1
# CUDA image: the reward-model scorer and training (synpref train, torchrun). Build from
# the repository root:
#   docker build -f docker/cuda.Dockerfile -t synpref-cuda .
#   docker build -f docker/cuda.Dockerfile --build-arg EXTRAS=vllm -t synpref-cuda:vllm .
# Not built in CI (no Docker engine there); skaffold.yaml builds it.
#
# PyPI's Linux torch wheels carry the CUDA runtime, cuDNN and NCCL as nvidia-* wheels, so a
# plain Python base is enough: the node provides only the driver (NVIDIA container toolkit
# or GPU operator). CUDA_BASE lets a cluster that prefers NVIDIA's base images use one.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build -------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Every package at the version CI passed with (constraints.txt, `make lock`), the wheel's
# build requirements included. vLLM pins its own torch: build EXTRAS=vllm with
# --build-arg CONSTRAINTS= (empty) to let it choose, as `pip install 'synpref[vllm]'` does.
ARG CONSTRAINTS=/src/constraints.txt
COPY constraints.txt ./
# cu128 wheels run on Hopper and Blackwell; override for older drivers (e.g. .../whl/cu124).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple \
      "torch${CONSTRAINTS:+==$(sed -n 's/^torch==//p' constraints.txt)}"
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY shared/ shared/
COPY services/ services/
COPY training/ training/
COPY client/ client/
# EXTRAS=vllm adds the vLLM scorer backend.
ARG EXTRAS=""
RUN ${CONSTRAINTS:+env PIP_CONSTRAINT=${CONSTRAINTS}} pip install ".${EXTRAS:+[${EXTRAS}]}" \
 && python -c "import torch, synpref.v1.reward_pb2, synpref.shared.cli"

# --- runtime -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid ${UID} synpref \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /tmp --shell /usr/sbin/nologin synpref
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
USER ${UID}:${UID}
EXPOSE 50060 8080 9090 29400
ENTRYPOINT ["synpref"]
CMD ["--help"]
