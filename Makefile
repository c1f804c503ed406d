# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: serve test lint model report bench clean browser kubectl
SHELL := /bin/bash
# mypy reads the package through the editable install's links; say where the files are in the repository
REPOSITORY_PATHS := sed -E -e 's|^.*build/__editable__[^/]*/lstm_serve/(model\|export)/|\1/|' \
	-e 's|^.*build/__editable__[^/]*/lstm_serve/|service/|'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The package lstm_serve is assembled from service/, model/, export/ and models/ (pyproject.toml). A strict
# editable install links each file into build/: type checkers and import-linter see a plain package.
# A file added or removed changes its folder, and the install runs again.
PACKAGE_DIRS := $(shell find $(CURDIR)/service $(CURDIR)/model $(CURDIR)/export $(CURDIR)/models -type d -not -name __pycache__)
EDITABLE := --config-settings editable_mode=strict

# the serving runtime only: onnxruntime, FastAPI, uvicorn; no torch
$(VENV)/.runtime: pyproject.toml $(PACKAGE_DIRS) | $(BIN)/python
	$(BIN)/pip install -q $(EDITABLE) -e .
	touch $@

# everything: runtime + training (torch==2.13.0, aeon) + test tools
$(VENV)/.dev: pyproject.toml $(PACKAGE_DIRS) | $(BIN)/python
	$(BIN)/pip install -q $(EDITABLE) -e '.[train,dev]'
	touch $@ $(VENV)/.runtime

serve: $(VENV)/.runtime
	$(BIN)/lstm-serve serve

# lint, format, types and the import direction of the layers, then the suite (-rs: say why, were a test skipped;
# the 20 slowest listed, to keep it well under 10 minutes on 2 cores)
test: lint $(VENV)/.dev browser kubectl
	$(BIN)/python -m pytest -q -rs --durations=20

# kubectl builds the Kubernetes kustomization offline in the manifests' test (kustomize is built in)
kubectl:
	@command -v kubectl >/dev/null || apt-get install -y -qq --no-install-recommends kubectl >/dev/null

# a headless browser for the live page's test: Debian's chromium and its driver
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	set -o pipefail; $(BIN)/mypy 2>&1 | $(REPOSITORY_PATHS)
	$(BIN)/lint-imports

# retrain and re-export the shipped models (deterministic: fixed seed, one thread), ~4 minutes
model: $(VENV)/.dev
	$(MAKE) model-japanese-vowels model-basic-motions

model-%: $(VENV)/.dev
	$(BIN)/lstm-serve train --dataset $* --out-dir runs/$*  # each data set's recipe: model/train.py
	$(BIN)/lstm-serve export --checkpoint runs/$*/checkpoint.pt --repository models --name $* --version 1 --replace
	mkdir -p models/$*/training
	cp runs/$*/checkpoint.pt runs/$*/metrics.json runs/$*/training.png models/$*/training/

# models/REPORT.md: every cell on both data sets, 3 seeds each, plus the gradient-flow plot (~10 minutes)
report: $(VENV)/.dev
	$(BIN)/lstm-serve report --out-dir models

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# the benchmark tables and plots (docs/benchmarks.md): both servers on loopback, open loop, Redis, ~6 minutes
bench: $(VENV)/.dev
	$(BIN)/lstm-serve bench --out-dir service/bench/results
