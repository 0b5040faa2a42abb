# Every target runs from a fresh clone: `setup` creates .venv and installs the project first.
# The first of python3.11 / python3.12 / python3 that runs and is 3.11 or 3.12 (override:
# `make setup PYTHON=/path/to/python3.11`).
PYTHON ?= $(or $(shell for p in python3.11 python3.12 python3; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 13))' 2>/dev/null \
	&& command -v $$p && break; done),python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_FLAGS := --disable-pip-version-check --no-input --progress-bar off

.DEFAULT_GOAL := help
.PHONY: help setup up down status demo test test-unit sync lint lint-sql dbt-build serve web screenshot dashboard bench reliability

help: ## List the targets
	@echo "Usage: make <target>"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]'
	@touch $(STAMP)

# Copied once; an existing profiles.yml is never overwritten.
profiles.yml: | profiles.yml.example
	cp profiles.yml.example profiles.yml

setup: $(STAMP) profiles.yml ## Create .venv and install the project (quick when nothing changed)

up: setup ## Start the embedded MongoDB, ClickHouse and Redis (data in .data/)
	$(PY) -m devstack up

down: setup ## Stop the embedded servers (data stays in .data/)
	$(PY) -m devstack down

status: setup ## Show each embedded server: running, pid, port, connection string
	$(PY) -m devstack status

demo: setup up ## Set up, start the embedded stack, seed data ending now, one flow run; says how to open the dashboard
	$(PY) -m loader seed --tasks 10000 --live
	$(PY) -m flows.pipeline
	@$(PY) -m web --url

test: setup ## Run every test on a private stack (free ports, temp dir); set RUN_SLOW=1 for slow ones
	$(PY) -m pytest

test-unit: setup ## Only the tests that need no server (tests/unit: pure rules, seconds)
	$(PY) -m pytest tests/unit -q

sync: setup ## One flow run against whatever the env vars point to
	$(PY) -m flows.pipeline

serve: setup up ## Local Prefect server (SQLite in .data/prefect), flow every 15 min + runs on change, web dashboard
	$(PY) -m flows.serve --events --watch

web: setup ## The web dashboard at http://127.0.0.1:8050 (PIPELINE_WEB_PORT); live, through the Redis cache
	$(PY) -m web

screenshot: setup ## Save docs/dashboard.png (the README's picture of the overview; run after `make demo`)
	$(PY) -m web.screenshot docs/dashboard.png

dashboard: setup ## Print the pipeline dashboard (through the Redis cache)
	$(PY) -m flows.dashboard

dbt-build: setup ## dbt build (models + tests) against the env-configured ClickHouse (default: make up)
	$(VENV)/bin/dbt build

lint-sql: setup ## sqlfluff on the dbt models and tests (needs a running ClickHouse: make up)
	$(VENV)/bin/sqlfluff lint models tests/data

lint: setup ## ruff check + ruff format --check + mypy (the packages listed in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup ## Benchmarks against the baselines (quick run: BENCH_SCALE=20000; see bench/config.py)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev,bench]'
	$(PY) -m bench

reliability: setup ## Fault injection, hostile documents, security: every case, with a results table
	$(PY) -m pytest tests/reliability -m "slow or not slow" -p no:cacheprovider
