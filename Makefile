# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test lint typecheck format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first (it lies on this machine's disk), so nothing pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,models,dev]'
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(PY) -m app

lint: $(STAMP)
	$(VENV)/bin/ruff check app models tests
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

format: $(STAMP)
	$(VENV)/bin/ruff check --fix app models tests

clean:
	rm -rf $(VENV) build *.egg-info
