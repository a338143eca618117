# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pins-installed
PINS := requirements/base.lock requirements/nodeps.txt requirements/constraints.txt pyproject.toml
PIP := $(BIN)/python -m pip install --disable-pip-version-check -c requirements/constraints.txt

.PHONY: venv test test-slow demo lint clean

venv: $(STAMP)

# Rebuilt only when the venv is missing or a pin file changed. paddleclas, paddledet and
# paddleslim pin each other out (see requirements/nodeps.txt), so they go in with --no-deps.
$(STAMP): $(PINS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements/base.lock
	$(PIP) --no-deps -r requirements/nodeps.txt
	$(PIP) --no-deps -e .
	touch $@

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

demo: venv
	$(BIN)/shitu demo

lint: venv
	$(BIN)/python -m pyflakes shitu_cli tests benchmarks

clean:
	rm -rf $(VENV)
