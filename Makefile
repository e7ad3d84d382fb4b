# Two entry points for a fresh clone: `make demo` (the main job) and `make test`; `make lint` for CI.
# Each creates its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,plots]'
	touch $@

.PHONY: test lint demo
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

# ruff comes from the dev extra; the rules it checks are in pyproject.toml ([tool.ruff]).
lint: $(VENV)/.installed
	$(BIN)/ruff check .

demo: $(VENV)/.installed
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh
