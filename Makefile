# Two commands on a fresh machine: `make demo` and `make test`. Everything else is set up here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint pytest bench brokers down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=25.1"
	$(BIN)/python -m pip install -q -e ".[postgres,redis,registry]" --group test --group lint
	touch $(STAMP)

brokers: $(STAMP)
	$(BIN)/bridge dev up

down: $(STAMP)
	$(BIN)/bridge dev down

demo: brokers
	$(BIN)/python -m consumers.demo

lint: $(STAMP)
	$(BIN)/ruff check bridge consumers tests bench
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint pytest

bench: brokers
	$(BIN)/python -m bench.throughput

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
