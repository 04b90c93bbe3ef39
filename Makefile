# Two entry points (README): `make demo` and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup

$(VENV)/.installed: pyproject.toml scripts/setup_env.sh
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q
