# Two commands on a fresh clone: `make demo` (the embedded default job) and `make test` (the suite).
# Each creates .venv and installs the package with what it needs; nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/viscy demo

test: $(STAMP)
	$(BIN)/ruff check viscy tests benchmarks
	RAY_AUTH_MODE=token WANDB_MODE=offline $(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check viscy tests benchmarks
	$(BIN)/ruff format --check viscy tests benchmarks

clean:
	rm -rf $(VENV) demo_output .pytest_cache
