# billing-queue: every target does its own set-up (virtualenv + install).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-unit lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Run the demo: embedded PostgreSQL + in-process Redis unless BILLING_DATABASE_URL / BILLING_REDIS_URL are set;
## then six months of renewals, top-ups, dunning and cancels on an accelerated clock (a table per month).
demo: $(STAMP)
	$(BIN)/billing demo
	$(BIN)/billing demo --months 6

## The test suite (real PostgreSQL and Redis when configured, embedded otherwise).
test: $(STAMP)
	$(BIN)/python -m pytest

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy tasks db workers

clean:
	rm -rf $(VENV) .billing .pytest_cache
