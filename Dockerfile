# mailflow worker image: `mailflow worker` by default; the same image runs `reconcile`,
# `provision`, `check`, `smtp`, `send` (pass the subcommand as the container command).
#
#   docker build -t mailflow .
#   docker run --init --rm -e AWS_DEFAULT_REGION=ap-northeast-1 mailflow worker
#
# No PHP in here: in production the legacy script runs in the php-fpm sidecar (sidecar/),
# reached over FastCGI on 127.0.0.1:9000 inside the ECS task. A single-container variant
# with php-cli (exec transport) is described in docs/deploy.md, not built by default.
#
# Bump the base tag deliberately (and in both stages at once); in CI, pin it by digest too.

# --- build: a venv with exactly the locked versions -----------------------------------------
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/mailflow

WORKDIR /build

# Dependencies first, in their own layer: they change far less often than the source.
# requirements.lock is a `pip freeze` of the development venv, so it also names test tools;
# used as a *constraint* it pins every runtime dependency to the locked version while
# installing only what pyproject.toml's [project].dependencies actually need.
COPY requirements.lock pyproject.toml ./
# Optional extras, comma-separated: empty for the worker image; `dev` adds moto's server for
# the moto variant of docker-compose.yml (never in a production image).
ARG MAILFLOW_EXTRAS=""
RUN python -c "import os, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; extras = [e for e in os.environ['MAILFLOW_EXTRAS'].split(',') if e]; print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" > runtime-requirements.txt \
 && /opt/mailflow/bin/pip install --only-binary=:all: \
        --constraint requirements.lock --requirement runtime-requirements.txt

# The project itself, without touching the dependencies installed above.
COPY README.md ./
COPY src ./src
RUN /opt/mailflow/bin/pip install --no-deps . \
 && /opt/mailflow/bin/pip check \
 && /opt/mailflow/bin/mailflow --help > /dev/null

# --- run: the venv on a clean base, as a non-root user --------------------------------------
FROM python:3.11.14-slim-bookworm

ENV PATH=/opt/mailflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MAILFLOW_LOG_FORMAT=json \
    MAILFLOW_PROCESSOR_TRANSPORT=fastcgi \
    MAILFLOW_SPOOL_DIR=/var/spool/mailflow \
    MAILFLOW_HEALTH_FILE=/run/mailflow/worker.health

# A fixed numeric uid/gid, so `USER` is numeric (Kubernetes' runAsNonRoot can verify it) and
# volume ownership is predictable. The writable paths are declared VOLUMEs: with a read-only
# root filesystem (ECS readonlyRootFilesystem) they are the only places the worker writes, and
# ECS copies their owner and mode from the image into the task's bind mounts.
RUN groupadd --system --gid 10001 mailflow \
 && useradd --system --uid 10001 --gid mailflow --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mailflow \
 && install -d -o mailflow -g mailflow -m 0700 /var/spool/mailflow /run/mailflow

COPY --from=builder /opt/mailflow /opt/mailflow

VOLUME ["/var/spool/mailflow", "/run/mailflow", "/tmp"]

USER 10001:10001

# ECS and `docker stop` send SIGTERM; mailflow handles it itself (stop receiving, release
# prefetched messages, drain running deliveries within MAILFLOW_SHUTDOWN_GRACE_S, exit).
# PID 1: mailflow installs its own SIGTERM/SIGINT handlers, so the kernel's "PID 1 ignores
# signals without a handler" rule does not bite. What a bare PID 1 would not do is reap
# orphaned grandchildren; the fastcgi transport spawns no processes here, and for anything
# that does (the exec transport) run with an init: ECS `initProcessEnabled`, compose
# `init: true`, `docker run --init` (all three inject tini as PID 1).
STOPSIGNAL SIGTERM

# For docker/compose. ECS ignores this and uses the task definition's healthCheck (same command).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["mailflow", "check"]

ENTRYPOINT ["mailflow"]
CMD ["worker"]
