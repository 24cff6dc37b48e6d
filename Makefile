# Two commands from a fresh clone: `make demo` trains the article's CNN, `make test` runs the suite.
# Each makes its own virtual environment (.venv) with the pinned dependencies on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	PY=$(PY) bash scripts/demo.sh

test: $(VENV)/.installed
	$(PY) -m pytest tests

# nnlab vs its baselines, side by side on this machine (3 repeats; most of an hour on 2 cores): writes
# benchmarks/results-<processor kind>.json, then the README's tables from the results files.
# bench-quick is a smoke run. benchmarks/README.md says how each benchmark works.
bench: $(VENV)/.installed
	$(PY) benchmarks/run.py --save
	$(PY) scripts/readme_tables.py

.PHONY: bench-quick
bench-quick: $(VENV)/.installed
	$(PY) benchmarks/run.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
