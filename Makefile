# make demo / make test work on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/psai --database sqlite:///psai.db demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) psai.db psai.db-wal psai.db-shm psai-report.html

docs: $(STAMP)
	$(BIN)/cog -r docs/cli.md
	PSAI_WRITE_SCREENSHOT=1 $(BIN)/python -m pytest -q tests/test_report.py -k browser

bench: $(STAMP)
	$(BIN)/python -m bench
