# Two commands set everything up: `make run` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: run test bench soak clean help

help:
	@echo "make run    - install into .venv and start the proxy on 127.0.0.1:8080 (config.yaml)"
	@echo "make test   - install into .venv and run the whole test suite"
	@echo "make bench  - run the benchmarks; writes bench/results/latest.md"
	@echo "make clean  - remove .venv and caches (keeps data/)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,speed]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/provider-router serve --config config.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
