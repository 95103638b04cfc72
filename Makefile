# Two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CHECKOV_VENV := .venv-checkov
PYTEST_WORKERS ?= 2
ARGS ?=

.PHONY: install run test lint typecheck unit bench soak clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(CHECKOV_VENV)/.installed: requirements-checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-checkov.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.installed $(CHECKOV_VENV)/.installed node_modules/.installed

## The main job on the local stack: emulators + Azurite + local Functions host, a signed webhook batch, a summary.
run: $(VENV)/.installed node_modules/.installed
	$(PY) -m devstack.demo $(ARGS)

## ruff, and the import contracts in .importlinter (shared/ one way; deployed code never imports devstack/).
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache --no-logo

typecheck: $(VENV)/.installed
	$(PY) -m mypy

## Everything CI checks: lint, types, unit, integration (devstack), end-to-end (local host + Azurite), infra.
test: install lint typecheck
	CHECKOV=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov $(PY) -m devstack exec -- \
		$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(ARGS)

unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit $(ARGS)

bench: $(VENV)/.installed node_modules/.installed
	$(PY) -m bench $(ARGS)

soak: $(VENV)/.installed node_modules/.installed
	$(PY) -m bench.soak $(ARGS)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) node_modules .devstack .pytest_cache .mypy_cache .ruff_cache
