# syntax=docker/dockerfile:1
# CPU image: the pipeline services (annotator, gold-scorer, filter, writer), ingest, topics,
# desk and controller. Build from the repository root:
#   docker build -f docker/cpu.Dockerfile -t synpref .
#   docker build -f docker/cpu.Dockerfile --build-arg EXTRAS=judge-server -t synpref:judges .
# Not built in CI (no Docker engine there); skaffold.yaml builds it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: compile the wheel (setup.py generates the protobuf code) into a venv ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Every package at the version CI passed with (constraints.txt, `make lock`), the wheel's
# build requirements included (PIP_CONSTRAINT reaches pip's isolated build environment).
COPY constraints.txt ./
# CPU wheels of torch, at the locked version: the CUDA build would add gigabytes that these
# services never use. Its dependencies are brought to the locked versions by the install below.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "torch==$(sed -n 's/^torch==//p' constraints.txt)"
COPY pyproject.toml setup.py README.md ./
COPY protos/ protos/
COPY shared/ shared/
COPY services/ services/
COPY training/ training/
COPY client/ client/
# EXTRAS=judge-server adds `transformers serve` (the chart's devJudges: small judges on CPU).
ARG EXTRAS=""
RUN PIP_CONSTRAINT=/src/constraints.txt pip install ".${EXTRAS:+[${EXTRAS}]}" \
 && python -c "import synpref.v1.pair_pb2, synpref.shared.cli"

# --- runtime: the venv only, a non-root user, nothing to compile with -------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
# tcmalloc for every process: glibc's malloc returns PyTorch's large CPU activation buffers to
# the kernel after each forward and page-faults them back on the next; tcmalloc keeps them
# (figures in docs/scorer.md, "Memory allocator, measured"). A fixed path, so
# LD_PRELOAD does not depend on the architecture's library directory.
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(dpkg -L libtcmalloc-minimal4 | grep '/libtcmalloc_minimal\.so\.4$')" /usr/local/lib/libtcmalloc_minimal.so.4 \
 && test -e /usr/local/lib/libtcmalloc_minimal.so.4
RUN groupadd --system --gid ${UID} synpref \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /tmp --shell /usr/sbin/nologin synpref
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4 \
    TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776
WORKDIR /tmp
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER ${UID}:${UID}
EXPOSE 50051 9100 8000
ENTRYPOINT ["synpref"]
CMD ["--help"]
