# One image for the three services (DESIGN.md section 7).
#
#   docker build --build-arg SERVICE=gcaccumulator -t gcaccumulator .
#
# builds the production image (the last stage, "runtime"); SERVICE may also
# be given when the container starts. `payoutctl migrate` runs in the same
# image. `--target local` adds the sandbox executor and the local scheduler
# that docker-compose.yml runs; production never ships them. Neither stage
# has the embedded PostgreSQL or any dev tool: only the suite's own
# dependencies from pyproject.toml.

FROM python:3.11-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/venv

# The dependencies first, read from pyproject.toml, so that a change to the
# code alone reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb')); \
print('\n'.join(project['project']['dependencies']))" > requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt

# The suite itself as a wheel (no extras): its .sql queries and migrations
# travel inside it.
COPY shared ./shared
COPY gcaccumulator ./gcaccumulator
COPY gcbatchprocessor ./gcbatchprocessor
COPY gcmicrobatchprocessor ./gcmicrobatchprocessor
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/*.whl


FROM python:3.11-slim-bookworm AS base

# Cloud Run sets PORT and gives each instance a small CPU share: one worker
# with threads suits it; raise GUNICORN_WORKERS with the instance's CPUs.
# The timeout outlasts a scheduled run's lock (JOB_LOCK_TIMEOUT_S, 240).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8080 \
    GUNICORN_WORKERS=1 \
    GUNICORN_THREADS=8 \
    GUNICORN_TIMEOUT=300

RUN groupadd --system --gid 10001 payouts \
    && useradd --system --uid 10001 --gid payouts --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin payouts

COPY --from=build /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/payouts-entrypoint

WORKDIR /app
# Numeric, so that a runtime that checks "not root" can tell without
# reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["payouts-entrypoint"]
CMD ["serve"]


# For docker-compose.yml only: the stand-ins for the executors and Cloud
# Scheduler, run from /app as `scripts.*` modules.
FROM base AS local

COPY scripts/__init__.py scripts/sandbox_executor.py scripts/local_scheduler.py \
    ./scripts/


# The production image: the default target, so it is what a plain
# `docker build .` (or Cloud Build) produces.
FROM base AS runtime

ARG SERVICE=""
ENV SERVICE=${SERVICE}
USER 10001:10001
