# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_NAME := japanese-vowels
RUN_DIR := runs/$(MODEL_NAME)
ARTIFACTS := models/$(MODEL_NAME)/training

.PHONY: serve test lint model bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# the serving runtime only: onnxruntime, FastAPI, uvicorn; no torch
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# everything: runtime + training (torch==2.13.0, aeon) + test tools
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $@ $(VENV)/.runtime

serve: $(VENV)/.runtime
	$(BIN)/lstm-serve serve

test: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# retrain and re-export the shipped default model (deterministic: fixed seed, one thread)
model: $(VENV)/.dev
	$(BIN)/lstm-serve train --dataset $(MODEL_NAME) --out-dir $(RUN_DIR)
	$(BIN)/lstm-serve export --checkpoint $(RUN_DIR)/checkpoint.pt --repository models --name $(MODEL_NAME) --version 1
	mkdir -p $(ARTIFACTS)
	cp $(RUN_DIR)/checkpoint.pt $(RUN_DIR)/metrics.json $(RUN_DIR)/training.png $(ARTIFACTS)/

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# the README's benchmark table and plots: both servers on loopback, ~5 minutes
bench: $(VENV)/.dev
	$(BIN)/lstm-serve bench --out-dir service/bench/results
