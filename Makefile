# make run    the embedded default: API + one worker on 127.0.0.1:8000, SQLite, no external services
# make test   the test suite (needs the PostgreSQL and Redis described in the README)
# make lint   ruff
# make bench  benchmarks under bench/
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned so pip never swaps it for another build. On a machine
# with a GPU, set TORCH to the build you want (e.g. TORCH="torch==2.13.0 --index-url ...").
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test lint format bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
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
