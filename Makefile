# make run    the embedded default: API + one worker on 127.0.0.1:8000, SQLite, no external services
# make test   the test suite (needs the PostgreSQL and Redis described in the README)
# make lint   ruff
# make bench  benchmarks under bench/
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned so pip never swaps it for another build. Which build pip
# picks is up to its index: PyPI's Linux x86_64 torch is a CUDA build (several GB of nvidia-*
# wheels); macOS and Windows get CPU builds. Choose one with TORCH, e.g.
#   make venv TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
#   make venv TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"
# Given once, TORCH is remembered: a later `make run` or `make test` keeps that build.
TORCH_DEFAULT := torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Holds the TORCH the venv was built with; rewritten (so newer than STAMP) only when TORCH changes.
TORCH_CHOICE := $(VENV)/.torch
ifeq ($(origin TORCH),undefined)
TORCH := $(or $(shell cat $(TORCH_CHOICE) 2>/dev/null),$(TORCH_DEFAULT))
endif

.PHONY: venv run test lint format bench clean FORCE

venv: $(STAMP)

$(TORCH_CHOICE): FORCE
	@mkdir -p $(VENV)
	@if [ "$$(cat $@ 2>/dev/null)" != '$(TORCH)' ]; then printf '%s\n' '$(TORCH)' > $@; fi

# A changed TORCH in a built venv replaces its torch: pip would keep a 2.13.0+cpu for a 2.13.0+cu130.
$(STAMP): pyproject.toml $(TORCH_CHOICE)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(and $(wildcard $(STAMP)),$(filter $(TORCH_CHOICE),$?)),$(BIN)/python -m pip uninstall -q -y torch)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[worker,dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ddpm-jobs serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var test-artifacts
