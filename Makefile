# Each target works alone on a fresh machine: `make up` and `make test` install first.
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip -q --disable-pip-version-check
LOCK    := requirements.lock
# pytest for the fast loop: no cache directory, the 10 slowest tests named at the end
FAST    := -q -p no:cacheprovider --durations=10

.PHONY: install up test test-fast lint lock bench experiment reliability clean

install: $(STAMP)

# The environment is the lock file (every package pinned, with hashes); pyproject.toml keeps
# the ranges the code supports, and `make lock` resolves them again.
$(STAMP): pyproject.toml $(LOCK) scripts/install-system-deps.sh tests/js/package.json
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(PIP) install --require-hashes -r $(LOCK) 2>&1 | grep -v '^WARNING: Location' || true
	$(PIP) install --no-deps -e . 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import axiom, relay, testbed, prefect, aiosmtpd, dkim, importlinter"  # fail here, not later
	./scripts/install-system-deps.sh
	cd tests/js && npm install --silent --no-audit --no-fund
	touch $(STAMP)

# Resolve pyproject.toml's ranges (with the dev extra) into the lock again, keeping every pin
# that still fits; `make lock LOCK_FLAGS=--upgrade` moves each to the newest the ranges allow.
lock:
	test -x $(BIN)/uv || $(PIP) install uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
	  --generate-hashes --quiet $(LOCK_FLAGS) -o $(LOCK)

up: install
	$(BIN)/axiom up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache  # the layer contracts in .importlinter

# Lint and the unit tests in under a minute; hypothesis properties run a tenth of their
# examples (tests/examples.py), each database test runs on SQLite only, and tests marked
# integration stay for `make test` (which runs every one on SQLite and PostgreSQL).
test-fast: lint
	AXIOM_TEST_FAST=1 $(BIN)/pytest tests/unit -m "not integration" -k "not postgresql" -n 2 $(FAST)

# Three workers, each taking a whole module at a time, the longest first (tests/durations.py):
# most integration tests wait on processes and peers (README, "Tests").
test: lint
	$(BIN)/pytest -q -n 3 --dist loadfile --no-loadscope-reorder

bench: install
	$(BIN)/python -m bench  # submission, end_to_end, memory, soak (10 min): bench/__main__.py

# Governed against ungoverned sending in the sandbox, five scenarios (issue 17; ~14 min)
experiment: install
	$(BIN)/python -m bench.experiment --scale full

# The fault matrix at full scale (testbed/faults.py); rows also in bench/out/reliability.json
reliability: install
	$(BIN)/python -m bench.reliability --json bench/out/reliability.json

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .import_linter_cache
