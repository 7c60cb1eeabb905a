# SynPref developer commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.synpref-installed

.PHONY: help setup protos kafka helm chromium test test-unit test-integration lint demo bench clean cluster cluster-down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install --python $(PY) -e '.[dev,bench]'
	@touch $(STAMP)

setup: $(STAMP) protos kafka helm chromium ## create .venv and install everything (Python packages, Kafka, helm, Chromium)

protos: $(STAMP) ## generate Python code from protos/ into gen/
	$(PY) protos/generate.py

kafka: ## fetch Apache Kafka and its dependencies from Maven Central into .cache/kafka
	bash tools/kafka/fetch.sh

helm: ## build the helm binary from the Go module proxy into .cache/bin
	bash tools/helm/build.sh

chromium: ## install Debian's Chromium for the desk's browser test (apt-get, needs root)
	bash tools/chromium/install.sh

test: setup ## ruff, then the whole test suite (starts and stops a Kafka broker)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests

test-unit: setup ## fast unit tests only
	$(PY) -m pytest tests -m "not integration"

test-integration: setup ## integration tests against real services
	$(PY) -m pytest tests -m integration

lint: $(STAMP) protos ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy shared services training client

demo: $(STAMP) protos ## set up Python and run the curation loop on the embedded default (no cluster)
	$(VENV)/bin/synpref run --config examples/demo.yaml

bench: setup ## run the CPU benchmarks and print their figures
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean: ## remove generated code and caches (keeps .venv)
	rm -rf gen .pytest_cache .ruff_cache build *.egg-info

cluster: ## build (first time ~15 min) and start a single-node Kubernetes cluster (needs root); see docs/cluster.md
	bash tools/cluster/up.sh

cluster-down: ## stop the cluster and remove everything it made on the host
	bash tools/cluster/down.sh
