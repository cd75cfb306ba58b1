# Two commands from a fresh clone:  `make run`  and  `make test`.
# Creates .venv if missing, installs the package (preferring the small CPU torch wheel
# when no torch is installed), then runs the main job or the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test test-all bench lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null \
	  || $(PY) -m pip install "torch==2.13.0" \
	  || $(PY) -m pip install torch
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m lsm_train

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	$(PY) bench/measures.py

lint: $(STAMP)
	$(VENV)/bin/ruff check lsm_train tests bench

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) outputs multirun wandb site *.egg-info
