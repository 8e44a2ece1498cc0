# Two commands for a fresh machine with Python 3.11, git and make:
#   make run    set everything up, then the main job: the quickstart sweep (--resume: a second run shows
#               the finished sweep again instead of refusing to overwrite it)
#   make test   set everything up, then the test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/sr-tune tune search_spaces/quickstart.yaml --resume

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) runs mlflow.db optuna.db .pytest_cache
