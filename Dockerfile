# Container image of the dbsync operator.
#
# Build from the repository root:  docker build -t dbsync-operator:0.1.0 .
#
# The builder stage installs the pinned runtime dependencies and dbsync into a virtualenv at
# /opt/venv. The final stage copies only that virtualenv onto a fresh slim base, so no build
# tools, pip or package caches ship. Every runtime dependency comes as a prebuilt wheel, so
# neither stage needs a compiler.

FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies come first so that a change to dbsync's own code reuses this layer.
COPY requirements/runtime.txt requirements/runtime.txt
RUN pip install --no-cache-dir -r requirements/runtime.txt

COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY migrations/ migrations/

# The build backend is pinned and installed beside dbsync, because an isolated build would
# fetch whatever setuptools is newest. pip, setuptools and wheel are then removed, since
# nothing at run time installs packages.
RUN pip install --no-cache-dir setuptools==75.8.0 wheel==0.45.1 \
    && pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip uninstall --yes setuptools wheel pip


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="dbsync-operator" \
      org.opencontainers.image.description="Kubernetes operator that keeps PostgreSQL environments in step: migrations, schema diff, ledger checks, audit trail" \
      org.opencontainers.image.licenses="Apache-2.0"

# The root filesystem is mounted read-only in the deployment: bytecode was compiled at
# install time, and temporary files go to /tmp, which the Pod mounts as an emptyDir volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    HOME=/tmp

COPY --from=builder /opt/venv /opt/venv

# A numeric user lets Kubernetes check runAsNonRoot without an /etc/passwd entry.
USER 65532:65532

# 8080 serves kopf's liveness endpoint (/healthz), 9090 serves Prometheus metrics (/metrics).
EXPOSE 8080 9090

ENTRYPOINT ["dbsync", "operator"]
