# The README's commands. `make demo` and `make test` set everything up first (idempotent, fast when done).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test lint clean distclean

setup:
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(PY) -m fastssl.demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q -m "not gpu" --timeout=600 -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

# Build products and caches; keeps the virtualenv, runs/ and data/.
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also the virtualenv (the next `make setup` rebuilds it).
distclean: clean
	rm -rf $(VENV)
