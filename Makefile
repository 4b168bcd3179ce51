# Two commands: `make run` and `make test`. Both install what they need into .venv/ first
# (idempotent; a stamp makes the second run instant).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Engines write caches under $HOME by default; keep them in the repo's ignored area so runs repeat.
CACHE := $(CURDIR)/.cache
export XDG_CACHE_HOME := $(CACHE)
export HF_HOME := $(CACHE)/huggingface
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CACHE_ROOT := $(CACHE)/vllm
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export TORCH_EXTENSIONS_DIR := $(CACHE)/torch_extensions
export TRITON_CACHE_DIR := $(CACHE)/triton
export MUAI_CACHE_DIR := $(CACHE)/muai
PYTEST_ARGS ?=

.PHONY: run test install install-test bench clean

install:
	@scripts/bootstrap.sh run

install-test:
	@scripts/bootstrap.sh test

run: install
	$(VENV)/bin/muai up

test: install-test
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install-test
	$(VENV)/bin/muai bench

clean:
	rm -rf $(VENV) $(CACHE)
