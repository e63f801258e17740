# Procurator: `make demo` runs the main job, `make test` the whole suite. Both install what is missing.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# The tests marked nixpkgs_lib evaluate the NixOS modules with nixpkgs' lib, which is not in this
# repository nor reachable offline: they run when PROCURATOR_NIXPKGS_LIB names it (`make nixos-eval`
# finds the pinned one); otherwise tests/conftest.py deselects them and the run's summary says so.

.PHONY: setup demo test lint unit nixos-eval bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# The NixOS modules evaluated with nixpkgs' real lib: PROCURATOR_NIXPKGS_LIB, or the lib of the
# nixpkgs that flake.lock pins (fetched by nix, so it needs the network the first time).
nixos-eval: setup
	@bash scripts/nixos-eval.sh $(PYTEST_ARGS)

bench: setup
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python "$$b" || exit 1; done

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache
