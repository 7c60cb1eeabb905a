# SynPref developer commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.synpref-installed
# The editable install is a link tree (setup.py): adding or removing a module changes its
# folder, and that reinstalls.
PACKAGE_DIRS := $(shell find shared services training client protos/synpref -type d -not -name __pycache__ 2>/dev/null)
# mypy checks the installed packages, so first-party imports resolve (synpref.v1 is generated).
MYPY_PACKAGES := -p synpref.shared -p synpref.services -p synpref.training -p synpref.client

.PHONY: help install setup lock protos kafka helm chromium test test-cluster test-unit test-integration lint wheel-smoke gpu-bundle demo bench clean cluster cluster-down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# constraints.txt pins every package (tools/lock/compile.sh says why); `make lock` rewrites it.
$(STAMP): pyproject.toml setup.py constraints.txt $(PACKAGE_DIRS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt uv
	$(UV) pip install --python $(PY) -c constraints.txt --build-constraint constraints.txt -e '.[dev,bench]'
	@touch $(STAMP)

install: $(STAMP) protos ## create .venv and install the Python packages only (what lint, test-unit and demo need)

setup: $(STAMP) protos kafka helm chromium ## create .venv and install everything (Python packages, Kafka, helm, Chromium)

lock: ## re-resolve constraints.txt from pyproject.toml (ARGS=--upgrade moves every pin to the newest release)
	@test -x $(UV) || $(MAKE) install
	bash tools/lock/compile.sh $(ARGS)

protos: $(STAMP) ## generate Python code from protos/ into gen/
	$(PY) protos/generate.py

kafka: ## fetch Apache Kafka and its dependencies from Maven Central into .cache/kafka
	bash tools/kafka/fetch.sh

helm: ## build the helm binary from the Go module proxy into .cache/bin
	bash tools/helm/build.sh

chromium: ## install Debian's Chromium for the desk's browser test (apt-get, needs root)
	bash tools/chromium/install.sh

test: setup ## ruff, mypy, the wheel smoke check, the test suite (a Kafka broker), then tests/cluster on a local cluster
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(MYPY_PACKAGES)
	bash tools/wheel_smoke.sh
	$(PY) -m pytest tests --ignore=tests/cluster
	bash tools/cluster/test.sh

test-cluster: setup ## tests/cluster only: build and start the cluster and the images, run them, tear it down
	bash tools/cluster/test.sh

test-unit: $(STAMP) protos ## fast unit tests only (no Kafka, helm or Chromium needed)
	$(PY) -m pytest tests -m "not integration"

test-integration: setup ## integration tests against real services
	$(PY) -m pytest tests -m integration

lint: $(STAMP) protos ## ruff check, ruff format --check, mypy on the installed synpref packages
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(MYPY_PACKAGES)

wheel-smoke: ## build the sdist and wheel, install the wheel in a clean venv, score one conversation
	bash tools/wheel_smoke.sh

gpu-bundle: $(STAMP) protos ## gather .gpu/ for a run on a lent GPU machine and check it on the CPU paths (docs/gpu.md)
	bash tools/gpu/bundle.sh --check

demo: $(STAMP) protos ## set up Python and run the curation loop on the embedded default (no cluster)
	$(VENV)/bin/synpref run --config examples/demo.yaml

bench: setup ## run the CPU benchmarks and print their figures
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean: ## remove generated code, build output and caches (keeps .venv; the next make reinstalls)
	rm -rf gen .pytest_cache .ruff_cache .mypy_cache build dist *.egg-info $(STAMP)

cluster: ## build (first time ~15 min) and start a single-node Kubernetes cluster (needs root); see docs/cluster.md
	bash tools/cluster/up.sh

cluster-down: ## stop the cluster and remove everything it made on the host
	bash tools/cluster/down.sh
