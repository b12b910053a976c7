# billing-queue: every target does its own set-up (virtualenv + install).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install browser demo test test-unit lint chaos bench schema clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# the bench's extras (matplotlib, py-spy) on top of dev
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

## Run the demo: embedded PostgreSQL + in-process Redis unless BILLING_DATABASE_URL / BILLING_REDIS_URL are set;
## then six months of renewals, top-ups, dunning and cancels on an accelerated clock (a table per month).
demo: $(STAMP)
	$(BIN)/billing demo
	$(BIN)/billing demo --months 6

## Headless Chromium for the dashboard's browser test: Debian's chromium and chromium-driver
## (/usr/bin/chromium, /usr/bin/chromedriver), installed with apt-get when missing and we are root.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium and chromium-driver (browser test of the dashboard)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null \
	  || echo "note: apt-get could not install chromium chromium-driver; the browser test will skip (fail with BILLING_REQUIRE_BROWSER=1)"; \
	else \
	  echo "note: no /usr/bin/chromium or /usr/bin/chromedriver (install Debian's chromium and"; \
	  echo "      chromium-driver as root to run it); the browser test skips (fails with BILLING_REQUIRE_BROWSER=1)"; \
	fi

## The test suite (real PostgreSQL and Redis when configured, embedded otherwise).
test: $(STAMP) browser
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy tasks db workers bench harness
	$(BIN)/lint-imports

## Chaos while load flows (docs/reliability.md): its own database and redis-server, SIGKILLed workers, a Redis
## restart, terminated PostgreSQL connections, a misbehaving provider, then the audit. CHAOS_SECONDS (120),
## CHAOS_SEED (random, printed: replays a run), CHAOS_FAULTS=0 for the soak; writes the figures to docs/reliability.md.
chaos: $(STAMP)
	$(BIN)/python -m harness.chaos --write-docs

## Benchmarks (docs/benchmarks.md, docs/benchmarks.png): pgbench running the money path's SQL, a no-op
## Dramatiq actor, a naive Dramatiq + asyncpg worker and `billing worker`, interleaved over rounds, on its own
## databases and redis-server (configured PostgreSQL/Redis when BILLING_DATABASE_URL/BILLING_REDIS_URL are set,
## embedded otherwise); latency, scaling, scheduler, memory. ~15 min; BENCH_QUICK=1 for a ~2 min smoke run
## (figures under test-artifacts/bench/). Knobs: BENCH_ROUNDS, BENCH_PROCESSES, BENCH_THREADS, BENCH_SECONDS,
## BENCH_ACCOUNTS, BENCH_LARGE_ACCOUNTS, BENCH_SCALING, BENCH_SCHEDULER_DUE, BENCH_PROFILE=1 (py-spy).
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench --write-docs

## Regenerate db/schema.sql, the declared schema the migration tests compare the migrated head with
## (after adding a migration; needs BILLING_DATABASE_URL, a server it may create a scratch database on).
schema: $(STAMP)
	$(BIN)/python -m db.migrate --dump-schema --write

clean:
	rm -rf $(VENV) .billing .pytest_cache
