# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= $(if $(wildcard config.yaml),config.yaml,config.yaml.example)

.PHONY: run test lint pyz bench soak screenshot clean

PIP := $(PY) -m pip install -q --disable-pip-version-check

# `run` installs only what serving needs (h11, anyio, pyyaml, cryptography); `test`, `lint` and `bench` add the
# test extras. Each stamp is redone when pyproject.toml changes.
$(VENV)/.installed-run: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(VENV)/.installed: $(VENV)/.installed-run
	$(PIP) --upgrade pip
	$(PIP) -e '.[test]'
	touch $@

run: $(VENV)/.installed-run
	$(PY) -m at_gateway serve --config $(CONFIG)

# On every CPU (pytest-xdist), each test module in one process (its module fixtures: one browser, one .pyz build).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --dist loadfile

# The one-file build: dist/at-gateway.pyz (needs only python3 with pip; wheels cached in build/wheel-cache).
pyz:
	$(PYTHON) build_zipapp.py

# Benchmarks are not tests (nothing in `make test` depends on timing). See bench/README.md.
# `make bench BENCH_ARGS="--duration 5"`; uvloop (optional, never required) is measured too when installable.
# The .pyz rows: dist/at-gateway.pyz, built first, under a stock /usr/bin/python3 -I -S (BENCH_PYZ_PYTHON=...).
bench: $(VENV)/.installed
	@$(PY) -c 'import uvloop' 2>/dev/null || $(PY) -m pip install -q 'uvloop>=0.19' \
		|| echo "bench: uvloop not installable; measuring asyncio only"
	$(PY) build_zipapp.py
	$(PY) bench/run.py --pyz dist/at-gateway.pyz $(BENCH_ARGS)

# Steady mixed load (streams, disconnects, upstream errors), RSS every 30 s: `make soak SOAK_DURATION=120`.
SOAK_DURATION ?= 600
soak: $(VENV)/.installed
	$(PY) bench/soak.py --duration $(SOAK_DURATION) $(SOAK_ARGS)

# docs/dashboard.png, the README's picture of the dashboard: a gateway with a mock upstream, an hour of demo traffic
# (the rollups of the hour before now written straight into its database, live requests on top), headless Chromium.
# `$(PY) tests/dashboard_demo.py` alone serves the same demo until Ctrl-C, to look at by hand.
screenshot: $(VENV)/.installed
	$(PY) tests/dashboard_demo.py --screenshot docs/dashboard.png

lint: $(VENV)/.installed
	$(PY) -m ruff check at_gateway tests bench
	$(PY) -m mypy

clean:
	rm -rf $(VENV) dist build *.egg-info .pytest_cache .mypy_cache .ruff_cache
