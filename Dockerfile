# billing-queue: one image for every `billing` command.
# Default: `billing worker` (Dramatiq over the queues billing and billing.payments).
# docker-compose.yml also runs it as `billing db upgrade` (the migration step).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package build needs (pyproject.toml names README.md as its
# readme); .venv, .billing/, tests and caches stay out of the image.  Keep this
# list in step with [tool.setuptools] packages in pyproject.toml.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tasks/ tasks/
COPY workers/ workers/
# the harness: `billing demo` (an entry point of the billing.commands group) and its services
COPY harness/ harness/
COPY db/ db/
COPY migrations/ migrations/

RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --create-home --home-dir /home/billing billing

# Run from an empty, writable directory: `billing worker` execs
# `python -m dramatiq workers.actors`, which puts the current directory on
# sys.path, so the installed package (not /src) is what gets imported.
USER billing
WORKDIR /home/billing

CMD ["billing", "worker"]
