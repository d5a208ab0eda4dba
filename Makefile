# Every stage of the pipeline is a target; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/train.yaml
ARGS   ?=
PYTEST_ARGS ?=

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}'

# The venv is (re)installed whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP) ## create .venv and install the project (done by every target that needs it)

train: $(STAMP) ## fine-tune with LightningCLI (CONFIG=configs/train.yaml ARGS="--trainer.max_epochs=2")
	$(PY) -m visionapp fit --config $(CONFIG) $(ARGS)

test: $(STAMP) ## run the whole test suite on the CPU (PYTEST_ARGS="-k bundle" to pick)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint + format check, mypy on src
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## remove generated runs, archives and caches (keeps data/ and .venv)
	rm -rf runs model_store logs .pytest_cache .ruff_cache .mypy_cache

.PHONY: help venv train test lint format clean

RUN ?= runs/latest
SAMPLES ?= 50
explain: $(STAMP) ## Captum heatmaps for a sample of RUN's test split + quality table (RUN=runs/latest SAMPLES=50)
	$(PY) explain/quality.py --run $(RUN) --samples $(SAMPLES)
	@echo "heatmaps: $(RUN)/explanations/<method>/*.png; your own images: python explain/heatmap.py --help"
.PHONY: explain
