# Entry points for developers and CI. `make setup` installs and starts what the project needs
# (see scripts/setup.sh); every other target uses the tools inside .venv.
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint typecheck golden clean stress-stops

setup:
	bash scripts/setup.sh

run: setup
	exec $(BIN)/registrar watch $(ARGS)

# Serial, and with every property test's full count of examples (the Hypothesis profile
# "thorough", tests/hypothesis_profiles.py) unless HYPOTHESIS_PROFILE says otherwise.
test: setup lint typecheck
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-thorough} $(BIN)/pytest $(PYTEST_ARGS)

# The pure and in-memory tests only: they need the virtualenv, no daemon (setup runs only when
# the virtualenv is missing or older than pyproject.toml). On 2 xdist workers, as much of the
# tier waits on real sockets and threads (tests/test_checker.py, ~9 s in a row): worksteal lets
# the other worker take what is queued behind those. Only this tier runs in parallel
# (PYTEST_ARGS=-n0 runs it serially).
test-fast:
	@[ -x $(BIN)/pytest ] && [ $(VENV)/.installed -nt pyproject.toml ] || bash scripts/setup.sh
	$(BIN)/pytest -m "not real" -n 2 --dist worksteal $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check registrar tests bench demo
	$(BIN)/pytest -q -p no:cacheprovider tests/test_layers.py

typecheck: setup
	$(BIN)/mypy

# After an intended change of the HAProxy template: rewrite tests/golden/, then review `git diff`.
golden: setup
	REGISTRAR_REGENERATE_GOLDEN=1 $(BIN)/pytest -q -p no:cacheprovider tests/test_haproxy_config.py
	git --no-pager diff --stat -- tests/golden

# SIGTERM at random moments while etcd refuses TLS, while it is cut, and to a sidecar waiting
# for its container: 50 rounds each (the suite runs 10). Every exit must come within 5 s.
stress-stops: setup
	REGISTRAR_STOP_ROUNDS=50 $(BIN)/pytest -q -p no:cacheprovider tests/test_real_stops.py

clean:
	rm -f $(VENV)/.installed

# `make bench`: registrar vs the classic shell sidekick on real Docker and etcd; prints the
# table and writes bench/results.md (about 5 minutes). BENCH_ARGS=--quick for a short run.
BENCH_ARGS ?=
.PHONY: bench
bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

# `make demo`: a 4-host cluster on this machine (network namespaces, an engine and an agent
# per host, 3 etcd, 2 routers) and the deploy flow narrated, then a host dies (root; < 2 min).
DEMO_ARGS ?=
.PHONY: demo
demo: setup
	$(BIN)/python -m demo $(DEMO_ARGS)
