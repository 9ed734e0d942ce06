# The front door. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo.pkl

.PHONY: demo test check install lint layers docs clean bytecode

# Recreated when pyproject.toml changes (torch: the version pyproject.toml pins; see its comment on the build).
# uv installs what pip takes about 70 s for in about 20 s on 2 cores (parallel downloads; the bytecode of every
# package compiled on every core, which processes that import Ray and torch need: see `bytecode`). uv reads no
# pip settings: the find-links pip is configured with (PIP_FIND_LINKS or a pip.conf: folders of local wheels,
# such as a machine's CPU build of torch) are passed on to it.
UV_VERSION := 0.13.10
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv==$(UV_VERSION)
	links=$$($(PY) -m pip config list | sed -n "s/.*find-links='\(.*\)'/\1/p" | tr ' ' '\n' | sort -u); \
	$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode \
		$$(for link in $$links; do printf -- '--find-links %s ' "$$link"; done) -e '.[dev]'
	touch $@

install: $(VENV)/.installed

$(DEMO_DATA): | $(VENV)/.installed
	$(PY) -m raytrain_app.data synth --out $(DEMO_DATA)

# The package's bytecode, compiled here: with PYTHONDONTWRITEBYTECODE set (as on this project's machines) imports
# never cache it, and every Ray process of every run (driver, controller, workers, actors) would compile the
# package again, about 0.3 s of CPU each.
bytecode: $(VENV)/.installed
	$(PY) -m compileall -q raytrain_app

# Trains the demo model with 2 CPU workers on a local Ray instance (about 30 s on 2 cores).
demo: bytecode $(DEMO_DATA)
	$(PY) -m raytrain_app.main --data $(DEMO_DATA) --num-workers 2 --epochs 5

# Everything (CONTRIBUTING.md, "The test suite"): the layering and cycle contracts (pyproject.toml,
# docs/architecture.md) and ruff first, seconds, then every test, Ray clusters, the S3 server and benchmarks
# included. What CI runs.
test: bytecode layers lint
	$(PY) -m pytest -n 2 --dist worksteal

# The quick tier, under a minute: the same contracts and ruff, then every test that uses none of the slow
# fixtures (no Ray, no S3 server, no training process; tests/conftest.py marks the others `slow`).
check: bytecode layers lint
	$(PY) -m pytest -n 2 -m "not slow"

layers: $(VENV)/.installed
	$(VENV)/bin/lint-imports --no-cache

# docs/cli.md is generated from the config dataclasses; a test fails when it is stale.
docs: $(VENV)/.installed
	$(PY) -m raytrain_app.cli.reference > docs/cli.md

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check raytrain_app tests benchmarks

clean:
	rm -rf $(VENV) checkpoints data .pytest_cache .import_linter_cache
	find raytrain_app -name __pycache__ -type d -prune -exec rm -rf {} +
