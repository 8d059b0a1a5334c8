# syntax=docker/dockerfile:1.7
# One image for every Leadwerk service; the command chooses which one runs:
#   python -m leadwerk_ingest | leadwerk_scoring | leadwerk_workflow | leadwerk_mailer |
#   leadwerk_crm_bridge, and python -m leadwerk_platform.bootstrap for the set-up Job.
# Build: docker build -t leadwerk:dev .   (deploy/README.md: running it, Kubernetes)
#
# Pin the base image by digest in your registry (PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:…);
# uv is pinned to the version the lockfile is maintained with.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
# Bytecode compiled here (the runtime file system is read-only), packages copied rather than
# linked, the base image's interpreter only, the environment where the runtime expects it.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src

# Third-party dependencies first: this layer is rebuilt only when the lockfile changes.
# The services are named one by one instead of --all-packages: the workspace root depends on
# leadwerk-platform[embedded] (Postgres and broker binaries for `make run`), which no pod needs.
COPY pyproject.toml uv.lock ./
COPY libs/platform/pyproject.toml libs/platform/
COPY services/ingest/pyproject.toml services/ingest/
COPY services/scoring/pyproject.toml services/scoring/
COPY services/workflow/pyproject.toml services/workflow/
COPY services/mailer/pyproject.toml services/mailer/
COPY services/crm-bridge/pyproject.toml services/crm-bridge/
ARG PACKAGES="--package leadwerk-ingest --package leadwerk-scoring --package leadwerk-workflow \
 --package leadwerk-mailer --package leadwerk-crm-bridge"
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-install-workspace ${PACKAGES}

# Then Leadwerk's own packages, installed as wheels (not editable: no source tree at run time).
COPY libs/ libs/
COPY services/ services/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable ${PACKAGES}


FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 leadwerk \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin leadwerk
# Installed packages find config/ and schemas/ through these variables (the default is the
# checkout, which an image does not have). Everything that writes goes to /tmp, the only
# writable path in the pod (an emptyDir): faust's data folder included (kafka/streams.py).
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LEADWERK_CONFIG_DIR=/app/config \
    LEADWERK_SCHEMAS_DIR=/app/schemas
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY config/ /app/config/
COPY schemas/ /app/schemas/
# Files stay root-owned and read-only for the service user.
USER 10001:10001
EXPOSE 8080
CMD ["python", "-c", "raise SystemExit('choose a service: python -m leadwerk_ingest (or leadwerk_scoring, leadwerk_workflow, leadwerk_mailer, leadwerk_crm_bridge, leadwerk_platform.bootstrap)')"]
