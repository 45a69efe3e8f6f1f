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

# The page test drives Debian's Chromium; install it (and its driver) when missing.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
$(BROWSER):
	apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)

test: $(STAMP) $(BROWSER)
	$(BIN)/ruff check viscy tests benchmarks
	RAY_AUTH_MODE=token WANDB_MODE=offline $(BIN)/python -m pytest -q -ra --durations=25 -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check viscy tests benchmarks
	$(BIN)/ruff format --check viscy tests benchmarks

clean:
	rm -rf $(VENV) demo_output .pytest_cache
