# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Each creates .venv (Python 3.11+), installs halo_jax with the pinned versions of constraints.txt, and runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
# Two pytest workers (pytest-xdist), one per core; a test file stays on one worker so its
# module fixtures (built models, compiled steps) are made once.
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo test test-e2e install clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m halo_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-e2e: $(VENV)/.installed
	$(PY) -m pytest -q -m e2e

clean:
	rm -rf $(VENV) workdir
