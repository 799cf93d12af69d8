# syntax=docker/dockerfile:1

# batch-pipeline: the batch-scoring job (and the reference model server) as one image.
#   docker build -t ghcr.io/example/batch-pipeline:0.1.0 .
# Build for linux/amd64: pgserver (an install dependency) ships no linux/arm64 wheel.

# --- builder: resolve the locked dependencies into /app/.venv --------------------
FROM python:3.11-slim AS builder

# uv, pinned to the release that wrote uv.lock (lock format revision 5).
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /uvx /bin/

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=0 \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /src

# Dependencies first: this layer is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable --no-install-project

# Then the project itself, installed as a wheel (hatchling puts sql/ in it as library/sql).
COPY library/ library/
COPY pipeline/ pipeline/
COPY sql/ sql/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable

# --- runtime: the interpreter and the venv, nothing else --------------------------
FROM python:3.11-slim

LABEL org.opencontainers.image.title="batch-pipeline" \
      org.opencontainers.image.description="Batch-scoring ETL: transaction CSVs from S3/MinIO, validated, scored against an ML API, upserted into PostgreSQL." \
      org.opencontainers.image.version="0.1.0"

RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-log-init --create-home --home-dir /home/app app

COPY --from=builder /app/.venv /app/.venv

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /home/app
USER 10001:10001

# The job flushes what was scored on SIGTERM and exits 143; give it time (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["batch-pipeline"]
CMD ["run"]
