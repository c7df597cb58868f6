# Entry points for developers and CI. `make setup` installs and starts what the project needs
# (see scripts/setup.sh); every other target uses the tools inside .venv.
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint typecheck clean

setup:
	bash scripts/setup.sh

run: setup
	exec $(BIN)/registrar watch $(ARGS)

test: setup lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -m "not real" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check registrar tests bench
	$(BIN)/pytest -q -p no:cacheprovider tests/test_layers.py

typecheck: setup
	$(BIN)/mypy

clean:
	rm -f $(VENV)/.installed

# `make bench`: registrar vs the classic shell sidekick on real Docker and etcd; prints the
# table and writes bench/results.md (about 5 minutes). BENCH_ARGS=--quick for a short run.
BENCH_ARGS ?=
.PHONY: bench
bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)
