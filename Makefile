# Each target works alone on a fresh machine: `make up` and `make test` install first.
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIP     := $(BIN)/pip -q --disable-pip-version-check

.PHONY: install up test lint bench reliability clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system-deps.sh tests/js/package.json
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(PIP) install -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	$(BIN)/python -c "import axiom, relay, prefect, aiosmtpd, dkim"  # fail here, not later
	./scripts/install-system-deps.sh
	cd tests/js && npm install --silent --no-audit --no-fund
	touch $(STAMP)

up: install
	$(BIN)/axiom up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m bench  # submission, end_to_end, memory, soak (10 min): bench/__main__.py

reliability: install
	$(BIN)/python -m bench.reliability --json bench/out/reliability.json

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
