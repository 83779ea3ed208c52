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

# --dist loadscope: each test class (and module of plain functions) runs on one worker, so its
# compiled programs, setUpClass state and ppi_py's numba specialisations are built once, not
# once per worker (stats files on 2 loaded cores: load 174 s, loadscope 132 s, loadfile 216 s).
test: install-test
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --durations=15 tests

clean:
	rm -rf $(VENV) workdirs
