# Every target here is for a developer's machine or CI. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install run demo test lint fmt migrate deploy-dry-run bench-ingest bench-conversion bench-payouts soak clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-17s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the suite with its dev tools

run: $(STAMP) ## run the local system: database, migrations, services
	$(BIN)/python -m scripts.run_local

demo: $(STAMP) ## run the system on its own ports, replay traffic, check, stop
	$(BIN)/python -m scripts.demo

test: $(STAMP) ## run every test (DATABASE_URL if set, else an embedded PostgreSQL)
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP) ## check formatting, lint rules and types
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: $(STAMP) ## format the code and apply safe lint fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

migrate: $(STAMP) ## apply database migrations (payoutctl migrate)
	$(BIN)/payoutctl migrate

# The version a deploy would ship: the commit, unless VERSION=... is given.
VERSION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)

deploy-dry-run: $(STAMP) ## print every gcloud command a deploy of scripts/deploy.toml would run (runs none)
	$(BIN)/python -m scripts.deploy --config scripts/deploy.toml --version $(VERSION) --dry-run

bench-ingest: $(STAMP) ## benchmark IPN ingestion against gunicorn, with pgbench's ceiling
	$(BIN)/python -m scripts.bench.ingest

bench-payouts: $(STAMP) ## benchmark one /process run over 100,000 clients, then task delivery
	$(BIN)/python -m scripts.bench.payouts

bench-conversion: $(STAMP) ## time the micro-batch check, claim and USDT sharing over a large history
	$(BIN)/python -m scripts.bench.conversion

soak: $(STAMP) ## a minute of signed IPNs through the whole local system, then check it all
	$(BIN)/python -m scripts.bench.soak $(SOAK_ARGS)

clean: ## remove the virtual environment and local database
	rm -rf $(VENV) .data
