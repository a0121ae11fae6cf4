# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test quick lint demo paper clean

# PYTHONWARNINGS on the editable install: setuptools warns that the folders data/, models/, ... differ
# from their installed names; that is the design (risgd_common/aliases.py), nothing a user can act on.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	PYTHONWARNINGS=ignore $(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The whole suite on TEST_WORKERS pytest-xdist workers (the ten slowest tests printed at the end), a test file per worker at a time (its module
# fixtures, e.g. one gloo group for all engine scenarios, run once); TEST_WORKERS=0 runs it in this process.
# pytest exits 5 when it collects no test; that is not a failure of the suite.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=10; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# The edit-test loop: ruff and every test not marked slow (no launches, no wheel), stopping at the first failure.
quick: lint
	$(PY) -m pytest -q -x -m "not slow"

demo: $(STAMP)
	$(PY) -m tools.demo

# The paper, experiment by experiment: every run, then reports/paper.md and paper.json (~90 min on
# 2 cores; re-running resumes). `$(PY) -m tools.paper --quick` is the short version (6-12 min measured on 2 cores).
paper: $(STAMP)
	$(PY) -m tools.paper

clean:
	rm -rf runs/demo* build *.egg-info
