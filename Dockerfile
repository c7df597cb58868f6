# registrar: the service-discovery agent as a container image.
#
#   docker build -t registrar .
#   docker run --rm registrar --version
#   docker run -d --name registrar --net=host \
#       -v /var/run/docker.sock:/var/run/docker.sock \
#       --group-add "$(stat -c %g /var/run/docker.sock)" \
#       registrar watch --host-ip "$COREOS_PRIVATE_IPV4"
#
# Where no image registry can be reached, build a local base first (docs/deploy.md):
#   scripts/build-base-image.sh     # registrar-base:bookworm, debootstrap, cached
#   docker build --build-arg BASE_IMAGE=registrar-base:bookworm \
#                --build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt -t registrar .
#
# Two stages: the builder makes a virtualenv in /opt/registrar and installs the project into
# it; the final image is the same base plus that virtualenv (pip, setuptools and wheel
# removed), no pip cache, no compilers, running as an unprivileged user. The entrypoint is
# the program itself in exec form: `docker stop` delivers SIGTERM straight to registrar
# (PID 1, which handles it: deregister, drain, exit 0).

# Any Debian-like image with python3 >= 3.11 and its venv module; both stages use it, so the
# virtualenv's interpreter path is the same in both.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS builder
# Optional pip settings for the build only (none of them reaches the final image):
# PIP_CERT, a CA bundle inside the build container, for networks that re-sign TLS (the local
# base carries the host's bundle at /etc/ssl/certs/ca-certificates.crt); PIP_INDEX_URL, a
# mirror of the package index.
ARG PIP_CERT=
ARG PIP_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/registrar
WORKDIR /src
# Dependencies first, in a layer that only pyproject.toml invalidates: the project's metadata
# with an empty package (and README) installed, then that package removed again.
COPY pyproject.toml ./
RUN set -eu; \
    [ -n "$PIP_CERT" ] && export PIP_CERT || unset PIP_CERT; \
    [ -n "$PIP_INDEX_URL" ] && export PIP_INDEX_URL || unset PIP_INDEX_URL; \
    mkdir registrar && : > registrar/__init__.py && : > README.md; \
    /opt/registrar/bin/pip install --no-compile . ; \
    /opt/registrar/bin/pip uninstall -y registrar; \
    rm -rf registrar build *.egg-info README.md
COPY README.md ./
COPY registrar ./registrar
RUN set -eu; \
    [ -n "$PIP_CERT" ] && export PIP_CERT || unset PIP_CERT; \
    [ -n "$PIP_INDEX_URL" ] && export PIP_INDEX_URL || unset PIP_INDEX_URL; \
    /opt/registrar/bin/pip install --no-deps --no-compile . ; \
    /opt/registrar/bin/pip uninstall -y pip setuptools wheel; \
    /opt/registrar/bin/python -m compileall -q -j 0 /opt/registrar; \
    /opt/registrar/bin/registrar --version

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/registrar-project/registrar
LABEL org.opencontainers.image.title="registrar" \
      org.opencontainers.image.description="Registers Docker containers' published ports in etcd v3 under leases, for service discovery" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.documentation="${SOURCE}/blob/main/docs/deploy.md" \
      org.opencontainers.image.licenses="Apache-2.0"
# An unprivileged user. It reads the Docker socket through the socket's group, given at run
# time: `--group-add $(stat -c %g /var/run/docker.sock)` (233 on CoreOS/Flatcar).
RUN groupadd --gid 10001 registrar \
 && useradd --uid 10001 --gid 10001 --no-create-home --no-log-init --home-dir /nonexistent \
        --shell /usr/sbin/nologin registrar
COPY --from=builder /opt/registrar /opt/registrar
ENV PATH=/opt/registrar/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# watch's default --metrics-addr (Prometheus /metrics and /healthz)
EXPOSE 9477
ENTRYPOINT ["/opt/registrar/bin/registrar"]
CMD ["--help"]
