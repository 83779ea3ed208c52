# Two entry points, each enough on its own on a fresh machine with Python >= 3.11:
#   make demo   -- create/update .venv, train the tiny MoR model on the embedded corpus
#   make test   -- create/update .venv with the test extra, run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/demo

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'

demo: install
	$(BIN)/python -m launch.main --config=configs/mor_tiny.py --workdir=$(WORKDIR)

test: install-test
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) workdirs
