# Every stage of the pipeline is a target; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/train.yaml
# configs/train.yaml is the base; any other CONFIG is an overlay composed on top of it (LightningCLI --config twice)
CONFIGS = --config configs/train.yaml $(if $(filter-out configs/train.yaml,$(CONFIG)),--config $(CONFIG))
ARGS   ?=
PYTEST_ARGS ?=
# make test's parallel workers (pytest-xdist, a test file per worker at a time, in the order tests/conftest.py sets):
# much of the suite waits on servers starting and answering, so two workers fill two cores; TEST_WORKERS=0 runs it
# in this one process.
TEST_WORKERS ?= 2

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-12s\033[0m %s\n", $$1, $$2}'

# The venv is (re)installed whenever pyproject.toml or the constraints change. CONSTRAINTS: the versions CI tested
# (constraints.txt); CONSTRAINTS= installs the newest versions pyproject.toml allows instead.
CONSTRAINTS ?= constraints.txt
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@echo "$(CONSTRAINTS)" > $@  # what it was installed with (the tests compare it with the environment)

venv: $(STAMP) ## create .venv and install the project (done by every target that needs it)

constraints: ## rewrite constraints.txt: a fresh venv with the newest versions pyproject.toml allows, frozen
	rm -rf .constraints-venv && python3 -m venv .constraints-venv
	.constraints-venv/bin/pip install -q --upgrade pip && .constraints-venv/bin/pip install -q '.[dev]'
	{ echo "# The versions CI tested: make constraints wrote this from a fresh install of .[dev]; make venv and the"; \
	  echo "# images install with it (CONSTRAINTS= for the newest versions pyproject.toml allows)."; \
	  .constraints-venv/bin/pip freeze --exclude-editable | grep -v '^visionapp'; } > constraints.txt
	rm -rf .constraints-venv

train: $(STAMP) ## fine-tune with LightningCLI (CONFIG=configs/folder.yaml ARGS="--trainer.max_epochs=2")
	$(PY) -m visionapp fit $(CONFIGS) $(ARGS)

test: $(STAMP) ## the whole test suite on the CPU, as CI runs it (PYTEST_ARGS="-k bundle" to pick)
	$(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

test-fast: $(STAMP) ## the unit tests: no server, no training past a few steps (about a minute)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint + format check, mypy on src, the import contracts between stages (import-linter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## remove archives, server logs and tool caches (keeps runs/, data/ and .venv)
	rm -rf model_store logs .pytest_cache .ruff_cache .mypy_cache

clean-runs: ## delete every trained run in runs/ (asks first; CONFIRM=yes to skip the question)
	@test -d runs || { echo "no runs/ folder: nothing to delete"; exit 0; }; \
	echo "this deletes runs/ ($$(ls runs | grep -vx latest | wc -l) runs, $$(du -sh runs | cut -f1)):"; ls runs | grep -vx latest | sed 's/^/  /'; \
	[ "$(CONFIRM)" = yes ] || { read -r -p "delete them? [y/N] " answer; [ "$$answer" = y ]; } || { echo "kept"; exit 1; }; \
	rm -rf runs && echo "deleted runs/"

.PHONY: help venv constraints train test test-fast lint format clean clean-runs

RUN ?= runs/latest
# MODEL_URI=models:/<name>/<version> (or /latest, @<alias>): a version in MLflow's model registry (the server
# MLFLOW_TRACKING_URI names) instead of RUN: fetched once into REGISTRY_DIR/<name>-v<version>/ and archived, served
# and imaged as a run is, its version named after the registry's
MODEL_URI    ?=
REGISTRY_DIR ?= runs/registry
ifneq ($(MODEL_URI),)
RUN := $(shell mkdir -p $(REGISTRY_DIR) && $(PY) -m visionapp.registry $(MODEL_URI) --out $(REGISTRY_DIR) 2>$(REGISTRY_DIR)/fetch.log)
ifeq ($(wildcard $(RUN)/bundle/model.json),)
$(error MODEL_URI=$(MODEL_URI) was not fetched: $(shell tail -2 $(REGISTRY_DIR)/fetch.log))
endif
endif
SAMPLES ?= 50
explain: $(STAMP) ## Captum heatmaps for a sample of RUN's test split + quality table (RUN=runs/latest SAMPLES=50)
	$(PY) -m visionapp.explain --run $(RUN) --samples $(SAMPLES)
	@echo "heatmaps: $(RUN)/explanations/<method>/*.png; your own images: python explain/heatmap.py --help"
report: $(STAMP) ## rebuild RUN's report.html (metrics, calibration, mistakes, quality) and print where it is
	$(PY) -m visionapp.explain.report --run $(RUN)
	@echo "open file://$(realpath $(RUN))/report.html"
.PHONY: explain report

# ---- archive and serve ---------------------------------------------------------------------------------------
MODEL_NAME      ?= classifier
MODEL_STORE     ?= model_store
# TorchServe's per-model settings (batching, workers, timeouts), packed into the .mar by make archive; the
# explanations' own (workers, queue, timeout) into <name>-explain.mar, served beside it
MODEL_CONFIG    ?= serve/model-config.yaml
EXPLAIN_CONFIG  ?= serve/explain-config.yaml
EXPLAIN_MODEL    = $(MODEL_NAME)-explain
INFERENCE_PORT  ?= 8080
MANAGEMENT_PORT ?= 8081
METRICS_PORT    ?= 8082
SERVE_DIR       ?= logs/serve-$(INFERENCE_PORT)
WAIT_TIMEOUT    ?= 180
WORKER_PORT     ?= $(shell expr $(INFERENCE_PORT) + 1000)
GRPC_INFERENCE_PORT  ?= $(shell expr $(INFERENCE_PORT) - 1010)
GRPC_MANAGEMENT_PORT ?= $(shell expr $(INFERENCE_PORT) - 1009)
TORCHSERVE      ?= $(abspath $(VENV))/bin/torchserve
# TorchServe's server config and log config (TS_LOG_CONFIG= empty: TorchServe's built-in logging)
TS_CONFIG       ?= serve/config.properties
TS_LOG_CONFIG   ?= serve/log4j2.xml
# The metrics /metrics exposes (TorchServe's and the handler's)
TS_METRICS_CONFIG ?= serve/metrics.yaml
# TorchServe reads these over serve/config.properties (enable_envvars_config=true). TMPDIR holds its pid file,
# one per server, and workers talk over /tmp/.ts.sock.$(WORKER_PORT): so servers on other ports run side by side
# and `make stop` stops only this one.
TS_ENV = TS_INFERENCE_ADDRESS=http://127.0.0.1:$(INFERENCE_PORT) \
         TS_MANAGEMENT_ADDRESS=http://127.0.0.1:$(MANAGEMENT_PORT) \
         TS_METRICS_ADDRESS=http://127.0.0.1:$(METRICS_PORT) TS_INITIAL_WORKER_PORT=$(WORKER_PORT) \
         TS_GRPC_INFERENCE_PORT=$(GRPC_INFERENCE_PORT) TS_GRPC_MANAGEMENT_PORT=$(GRPC_MANAGEMENT_PORT) \
         TS_ALLOWED_URLS='file://$(abspath $(MODEL_STORE))/.*\.mar' \
         TS_METRICS_CONFIG=$(abspath $(TS_METRICS_CONFIG)) \
         TMPDIR=$(abspath $(SERVE_DIR)) LOG_LOCATION=$(abspath $(SERVE_DIR)) METRICS_LOCATION=$(abspath $(SERVE_DIR))
TS_ARGS = --ts-config $(abspath $(TS_CONFIG)) $(if $(TS_LOG_CONFIG),--log-config $(abspath $(TS_LOG_CONFIG))) --model-store $(abspath $(MODEL_STORE)) \
          --models $(MODEL_NAME)=$(MODEL_NAME).mar $(EXPLAIN_REGISTRATION) --ncs
# the explanations' registration, where make archive made its archive (a store archived elsewhere may have none)
EXPLAIN_REGISTRATION = $(if $(wildcard $(MODEL_STORE)/$(EXPLAIN_MODEL).mar),$(EXPLAIN_MODEL)=$(EXPLAIN_MODEL).mar)

archive: $(STAMP) ## pack RUN's bundle into $(MODEL_STORE)/$(MODEL_NAME).mar and $(MODEL_NAME)-explain.mar (MODEL_CONFIG, EXPLAIN_CONFIG); exports its forms first if it has none
	$(PY) -m visionapp.deploy.export --bundle $(RUN)/bundle --if-missing $(EXPORT_ARGS)
	$(PY) -m visionapp.deploy.archive --bundle $(RUN)/bundle --name $(MODEL_NAME) --out $(MODEL_STORE) \
	  --model-config $(MODEL_CONFIG) --explain-config $(EXPLAIN_CONFIG)
	@echo "$(ARCHIVE_INPUTS)" > $(ARCHIVE_STAMP)

EXPORT_ARGS ?=
export: $(STAMP) ## RUN's model in its faster forms, each checked (AOTInductor, ONNX, int8 ONNX), into its bundle; the servers run the fastest
	$(PY) -m visionapp.deploy.export --bundle $(RUN)/bundle $(EXPORT_ARGS)

java-check:
	@command -v java >/dev/null || { echo "TorchServe needs Java 17 or newer: sudo apt-get install openjdk-17-jre-headless (or brew install openjdk@17)"; exit 1; }

# The archive is rebuilt whenever what it packs changed: the run's bundle (RUN moving to another run counts,
# runs/latest after a new make train included), the model config, or the serving code. Its version is the run's
# name: GET /models/$(MODEL_NAME) on the management API shows which run is served. Only an archive make made (its
# stamp beside it) or a missing one is managed so; a store archived elsewhere (the bench's, a test's) is served
# as it is.
SERVING_CODE := $(wildcard src/visionapp/*.py src/visionapp/serve/*.py src/visionapp/attribution/*.py)
RUN_BUNDLE = $(wildcard $(RUN)/bundle/model.pt $(RUN)/bundle/model.json $(RUN)/bundle/model.*.pt2 $(RUN)/bundle/model*.onnx)
ARCHIVE_INPUTS = $(realpath $(RUN)) $(abspath $(MODEL_CONFIG)) $(abspath $(EXPLAIN_CONFIG))
ARCHIVE_STAMP = $(MODEL_STORE)/.$(MODEL_NAME).inputs
MANAGED = $(or $(wildcard $(ARCHIVE_STAMP)),$(if $(wildcard $(MODEL_STORE)/$(MODEL_NAME).mar),,missing))
$(ARCHIVE_STAMP): FORCE
	@mkdir -p $(MODEL_STORE)
	@echo "$(ARCHIVE_INPUTS)" | cmp -s - $@ || echo "$(ARCHIVE_INPUTS)" > $@

$(MODEL_STORE)/$(MODEL_NAME).mar: $(if $(MANAGED),$(ARCHIVE_STAMP) $(RUN_BUNDLE) $(MODEL_CONFIG) $(EXPLAIN_CONFIG) $(SERVING_CODE))
	$(MAKE) archive

FORCE:

# SERVER=kserve: the same bundle and limits served by KServe's Python model server (visionapp.serve.kserve_server)
# on INFERENCE_PORT, loopback only; it has no token authorisation, no .mar and no Java.
# KSERVE_GRPC_PORT=8081 turns its gRPC endpoint on: KServe's gRPC server binds every interface (it has no address
# option), so it is off by default.
SERVER ?= torchserve
KSERVE_GRPC_PORT ?=
# seconds a request body may take to arrive on KServe's server (408 after: a stalled client frees its buffer)
BODY_TIMEOUT ?= 30
# SLIM=1 (SERVER=kserve): predictions from the bundle's ONNX form on ONNX Runtime, without torch (make export first);
# explanations are then answered 404, naming where they are served.
SLIM ?=
KSERVE_ARGS = --bundle $(RUN)/bundle --model-config $(MODEL_CONFIG) --explain-config $(EXPLAIN_CONFIG) --model_name $(MODEL_NAME) \
              --body-timeout $(BODY_TIMEOUT) $(if $(SLIM),--slim) \
              --host 127.0.0.1 --http_port $(INFERENCE_PORT) \
              $(if $(KSERVE_GRPC_PORT),--grpc_port $(KSERVE_GRPC_PORT),--enable_grpc false)
server-check:
	@case "$(SERVER)" in torchserve|kserve) ;; *) echo "SERVER must be torchserve or kserve, not '$(SERVER)'"; exit 2;; esac

serve: server-check serve-$(SERVER) ## serve RUN in the foreground (SERVER=torchserve|kserve INFERENCE_PORT=8080 MANAGEMENT_PORT=8081 METRICS_PORT=8082)
serve-bg: server-check serve-bg-$(SERVER) ## serve RUN in the background, return once the model answers (SERVER=torchserve|kserve)
stop: server-check stop-$(SERVER) ## stop the background server make serve-bg started (same SERVER and INFERENCE_PORT)

serve-torchserve: $(STAMP) java-check $(MODEL_STORE)/$(MODEL_NAME).mar
	@mkdir -p $(SERVE_DIR)
	@echo "Starting TorchServe; once the model is loaded, call it with:"
	@echo "  curl -H \"Authorization: Bearer \$$(python3 -c 'import json;print(json.load(open(\"$(SERVE_DIR)/key_file.json\"))[\"inference\"][\"key\"])')\" -T photo.jpg http://127.0.0.1:$(INFERENCE_PORT)/predictions/$(MODEL_NAME)"
	@echo "  (the inference key is in $(SERVE_DIR)/key_file.json; or: make predict IMG=photo.jpg)"
	cd $(SERVE_DIR) && $(TS_ENV) $(TORCHSERVE) --start --foreground $(TS_ARGS)

serve-bg-torchserve: $(STAMP) java-check $(MODEL_STORE)/$(MODEL_NAME).mar
	@mkdir -p $(SERVE_DIR)
	cd $(SERVE_DIR) && $(TS_ENV) $(TORCHSERVE) --start $(TS_ARGS) > torchserve.out 2>&1
	for model in $(MODEL_NAME) $(if $(EXPLAIN_REGISTRATION),$(EXPLAIN_MODEL)); do \
	  $(PY) -m visionapp.client.api wait --port $(INFERENCE_PORT) --management-port $(MANAGEMENT_PORT) --dir $(SERVE_DIR) \
	    --model $$model --timeout $(WAIT_TIMEOUT) \
	  || { cd $(SERVE_DIR) && TMPDIR=$(abspath $(SERVE_DIR)) $(TORCHSERVE) --stop; echo "TorchServe did not start; stopped it. See $(SERVE_DIR)/"; exit 1; }; done
	@echo "key: $(SERVE_DIR)/key_file.json; stop with: make stop INFERENCE_PORT=$(INFERENCE_PORT)"

stop-torchserve:
	cd $(SERVE_DIR) && TMPDIR=$(abspath $(SERVE_DIR)) $(TORCHSERVE) --stop

serve-kserve: $(STAMP)
	@echo "Starting KServe's model server; once ready, call it with:"
	@echo "  curl -T photo.jpg http://127.0.0.1:$(INFERENCE_PORT)/predictions/$(MODEL_NAME)   (or make predict SERVER=kserve IMG=photo.jpg)"
	$(PY) -m visionapp.serve.kserve_server $(KSERVE_ARGS)

serve-bg-kserve: $(STAMP)
	@mkdir -p $(SERVE_DIR)
	@test ! -s $(SERVE_DIR)/kserve.pid || ! kill -0 $$(cat $(SERVE_DIR)/kserve.pid) 2>/dev/null \
	  || { echo "a server from $(SERVE_DIR) is running (pid $$(cat $(SERVE_DIR)/kserve.pid)): make stop SERVER=kserve INFERENCE_PORT=$(INFERENCE_PORT)"; exit 1; }
	nohup $(PY) -m visionapp.serve.kserve_server $(KSERVE_ARGS) > $(SERVE_DIR)/kserve.out 2>&1 & echo $$! > $(SERVE_DIR)/kserve.pid
	$(PY) -m visionapp.client.api wait --server kserve --port $(INFERENCE_PORT) --model $(MODEL_NAME) --timeout $(WAIT_TIMEOUT) \
	  || { $(MAKE) -s stop-kserve SERVE_DIR=$(SERVE_DIR); tail -20 $(SERVE_DIR)/kserve.out; echo "KServe's server did not start; stopped it. See $(SERVE_DIR)/kserve.out"; exit 1; }
	@echo "stop with: make stop SERVER=kserve INFERENCE_PORT=$(INFERENCE_PORT)"

# SIGTERM: KServe's server drains and exits; waits for it (30 s), then kills it
stop-kserve:
	@test -s $(SERVE_DIR)/kserve.pid || { echo "no $(SERVE_DIR)/kserve.pid: nothing to stop"; exit 0; }; \
	pid=$$(cat $(SERVE_DIR)/kserve.pid); kill $$pid 2>/dev/null; \
	for i in $$(seq 60); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
	kill -9 $$pid 2>/dev/null; rm -f $(SERVE_DIR)/kserve.pid; echo "stopped KServe's server (pid $$pid)"

IMG ?=
DEMO_PORT ?= 7860
demo: $(STAMP) ## a page to try the model on 127.0.0.1:DEMO_PORT: the running server's answers (SERVER=...), else the bundle in process
	$(PY) -m pip install -q -e '.[demo]'
	$(PY) -m visionapp.client.demo --run $(RUN) --port $(DEMO_PORT) --server-port $(INFERENCE_PORT) \
	  --management-port $(MANAGEMENT_PORT) --dir $(SERVE_DIR) --server $(SERVER)

predict: $(STAMP) ## send IMG=photo.jpg to the running server (finds and renews the key); EXPLAIN=1 for a heatmap, V2=1 over the Open Inference Protocol
	@test -n "$(IMG)" || { echo "usage: make predict IMG=photo.jpg [EXPLAIN=1 TARGET=star]"; exit 2; }
	$(PY) -m visionapp.client.api $(if $(EXPLAIN),explain --save $(basename $(notdir $(IMG)))_heatmap.png $(if $(TARGET),--target $(TARGET)),$(if $(V2),infer,predict)) $(IMG) --port $(INFERENCE_PORT) --management-port $(MANAGEMENT_PORT) --dir $(SERVE_DIR) --model $(MODEL_NAME) --server $(SERVER)

describe: $(STAMP) ## what the running server serves: model, version, form, OOD threshold, then its model card
	$(PY) -m visionapp.client.api describe --port $(INFERENCE_PORT) --management-port $(MANAGEMENT_PORT) --dir $(SERVE_DIR) --model $(MODEL_NAME) --server $(SERVER)

.PHONY: archive export java-check server-check serve serve-bg stop serve-torchserve serve-bg-torchserve stop-torchserve serve-kserve serve-bg-kserve stop-kserve predict describe FORCE

# ---- predict a folder: Lightning's Trainer.predict over the run's bundle ---------------------------------------
IMAGES ?=
OUT    ?= predictions.csv
predict-folder: $(STAMP) ## score every image under IMAGES=dir with RUN's bundle → OUT=predictions.csv (ARGS="--topk 3 --strict")
	@test -n "$(IMAGES)" || { echo "usage: make predict-folder IMAGES=path/to/photos [RUN=runs/<run> OUT=predictions.csv ARGS=...]"; exit 2; }
	$(PY) -m visionapp.predict --bundle $(RUN)/bundle --images $(IMAGES) --out $(OUT) $(ARGS)

.PHONY: predict-folder

# ---- scale: TorchX ---------------------------------------------------------------------------------------------
NPROC  ?= 2
NNODES ?= 1
IMAGE  ?=
CPUS   ?= 2
GPUS   ?= 0
MEM_MB ?= 8192
DRYRUN ?=
TORCHX = PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/torchx   # torchrun must be on the workers' PATH

launch: $(STAMP) ## the training as an NPROC-process DDP job through TorchX on this machine (ARGS=... overrides)
	$(TORCHX) run -s local_cwd src/visionapp/launch.py:train --nproc $(NPROC) --cpu $(CPUS) $(if $(ARGS),-- $(ARGS))

launch-k8s: $(STAMP) ## the same job on Kubernetes/Volcano (IMAGE=registry/app:tag NNODES=2 NPROC=1 [DRYRUN=1])
	@test -n "$(IMAGE)" || { echo "usage: make launch-k8s IMAGE=registry/app:tag NNODES=2 NPROC=1 [CPUS=4 GPUS=1 MEM_MB=16384 DRYRUN=1]"; exit 2; }
	$(TORCHX) run -s kubernetes --workspace "" $(if $(DRYRUN),--dryrun) src/visionapp/launch.py:train --image $(IMAGE) \
	  --nnodes $(NNODES) --nproc $(NPROC) --cpu $(CPUS) --gpu $(GPUS) --memMB $(MEM_MB) $(if $(ARGS),-- $(ARGS))

launch-predict: $(STAMP) ## make predict-folder as an NPROC-process DDP job through TorchX (IMAGES=dir [RUN OUT ARGS])
	@test -n "$(IMAGES)" || { echo "usage: make launch-predict IMAGES=path/to/photos NPROC=2 [RUN=runs/<run> OUT=predictions.csv]"; exit 2; }
	$(TORCHX) run -s local_cwd src/visionapp/launch.py:predict --nproc $(NPROC) --cpu $(CPUS) --bundle $(RUN)/bundle \
	  --images $(abspath $(IMAGES)) --out $(abspath $(OUT)) $(if $(ARGS),-- $(ARGS))

launch-predict-k8s: $(STAMP) ## the same on Kubernetes (IMAGE=registry/app:tag NNODES=2 IMAGES=/data/photos OUT=/data/out.csv [DRYRUN=1])
	@test -n "$(IMAGE)" -a -n "$(IMAGES)" || { echo "usage: make launch-predict-k8s IMAGE=registry/app:tag IMAGES=/shared/photos OUT=/shared/predictions.csv NNODES=2 [DRYRUN=1]"; exit 2; }
	$(TORCHX) run -s kubernetes --workspace "" $(if $(DRYRUN),--dryrun) src/visionapp/launch.py:predict --image $(IMAGE) \
	  --nnodes $(NNODES) --nproc $(NPROC) --cpu $(CPUS) --gpu $(GPUS) --memMB $(MEM_MB) --bundle $(RUN)/bundle --images $(IMAGES) \
	  --out $(OUT) $(if $(ARGS),-- $(ARGS))

.PHONY: launch launch-k8s launch-predict launch-predict-k8s

# ---- deploy: the serving image, Kubernetes and KServe manifests ---------------------------------------------
# A container engine: podman or docker, whichever is found (ENGINE=docker to choose). ENGINE_FLAGS go before the
# subcommand (podman's --runtime runc --cgroup-manager=cgroupfs), BUILD_FLAGS/RUN_FLAGS after it (--ulimit, -v).
ENGINE       ?= $(firstword $(shell command -v podman docker 2>/dev/null))
ENGINE_FLAGS ?=
BUILD_FLAGS  ?=
RUN_FLAGS    ?=
# The base of the serving image, by digest where known: make base-image builds one locally with mmdebstrap and
# records its digest in BASE_LOCK, which then sets BASE_IMAGE; otherwise Debian's by tag (give a digest:
# BASE_IMAGE=docker.io/library/debian:bookworm-slim@sha256:... for builds that repeat).
LOCAL_BASE   := localhost/visionapp-base
BASE_LOCK    ?= .base-image.mk
-include $(BASE_LOCK)
BASE_IMAGE   ?= docker.io/library/debian:bookworm-slim
CONTAINER    ?= visionapp-serve-$(INFERENCE_PORT)
# Checked before anything is built (make runs prerequisites left to right): usage and engine first
need-engine:
	@test -n "$(ENGINE)" || { echo "no container engine found: install podman (apt-get install podman) or docker, or set ENGINE=..."; exit 1; }
need-image:
	@test -n "$(IMAGE)" || { echo "usage: make $(MAKECMDGOALS) IMAGE=registry.example/visionapp-serve:1 (see make help)"; exit 2; }

base-image: need-engine ## a Debian bookworm base image made locally with mmdebstrap (no manuals, locales, docs but the licences), for machines without a registry
	@command -v mmdebstrap >/dev/null || { echo "needs mmdebstrap: apt-get install mmdebstrap"; exit 1; }
	mmdebstrap --variant=minbase --include=ca-certificates \
	  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
	  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
	  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
	  bookworm - | $(ENGINE) $(ENGINE_FLAGS) import - $(LOCAL_BASE):bookworm
	@digest=$$($(ENGINE) $(ENGINE_FLAGS) image inspect --format '{{.Digest}}' $(LOCAL_BASE):bookworm) \
	  && echo "BASE_IMAGE ?= $(LOCAL_BASE)@$$digest" > $(BASE_LOCK) \
	  && echo "recorded in $(BASE_LOCK): the serving images now build FROM $(LOCAL_BASE)@$$digest"

image-serve: need-image need-engine server-check base-check image-serve-$(SERVER) ## the serving image with RUN's model baked in (IMAGE=visionapp-serve:1 [SERVER=kserve BASE_IMAGE=...])
base-check:
	@case "$(BASE_IMAGE)" in *@sha256:*) ;; *) echo "note: BASE_IMAGE=$(BASE_IMAGE) is a tag, not a digest: builds may differ (make base-image, or BASE_IMAGE=...@sha256:...)";; esac
image-serve-torchserve: $(MODEL_STORE)/$(MODEL_NAME).mar
	$(ENGINE) $(ENGINE_FLAGS) build -f serve/Dockerfile -t $(IMAGE) --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg PIN=$(if $(CONSTRAINTS),1,0) \
	  --build-arg MAR=$(MODEL_STORE)/$(MODEL_NAME).mar --build-arg EXPLAIN_MAR=$(MODEL_STORE)/$(EXPLAIN_MODEL).mar \
	  --build-arg MODEL_NAME=$(MODEL_NAME) $(BUILD_FLAGS) .
# KServe's server bakes the run's bundle, staged in the model store (runs/ is outside the build context)
image-serve-kserve: $(if $(SLIM),$(STAMP))
	@test -f $(RUN)/bundle/model.json || { echo "no $(RUN)/bundle: make train first (or RUN=runs/<run>)"; exit 1; }
	rm -rf $(MODEL_STORE)/$(MODEL_NAME).bundle && mkdir -p $(MODEL_STORE) && cp -rL $(RUN)/bundle $(MODEL_STORE)/$(MODEL_NAME).bundle
	$(if $(SLIM),$(PY) -m visionapp.slim $(MODEL_STORE)/$(MODEL_NAME).bundle --model-config $(MODEL_CONFIG))
	$(ENGINE) $(ENGINE_FLAGS) build -f serve/Dockerfile.kserve -t $(IMAGE) --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg PIN=$(if $(CONSTRAINTS),1,0) \
	  $(if $(SLIM),--build-arg SLIM=1 --build-arg REQUIREMENTS=serve/requirements-slim.txt) \
	  --build-arg BUNDLE=$(MODEL_STORE)/$(MODEL_NAME).bundle --build-arg MODEL_CONFIG=$(MODEL_CONFIG) \
	  --build-arg EXPLAIN_CONFIG=$(EXPLAIN_CONFIG) \
	  --build-arg MODEL_NAME=$(MODEL_NAME) --build-arg MODEL_VERSION=$(notdir $(realpath $(RUN))) $(BUILD_FLAGS) .

# The image run as a user would, on loopback: host networking with TorchServe bound to 127.0.0.1 on this
# Makefile's ports, token authorisation on (the key is read from the container into SERVE_DIR for the client).
CONTAINER_ENV = -e TS_INFERENCE_ADDRESS=http://127.0.0.1:$(INFERENCE_PORT) -e TS_MANAGEMENT_ADDRESS=http://127.0.0.1:$(MANAGEMENT_PORT) \
  -e TS_METRICS_ADDRESS=http://127.0.0.1:$(METRICS_PORT) -e TS_GRPC_INFERENCE_PORT=$(GRPC_INFERENCE_PORT) \
  -e TS_GRPC_MANAGEMENT_PORT=$(GRPC_MANAGEMENT_PORT)
image-run: need-image need-engine server-check $(STAMP) ## start IMAGE in a container on loopback (INFERENCE_PORT... [SERVER=kserve]), return once the model is ready
	@mkdir -p $(SERVE_DIR)
ifeq ($(SERVER),kserve)
	$(ENGINE) $(ENGINE_FLAGS) run -d --rm --name $(CONTAINER) --network host $(RUN_FLAGS) $(IMAGE) \
	  --host 127.0.0.1 --http_port $(INFERENCE_PORT) --enable_grpc false
else
	$(ENGINE) $(ENGINE_FLAGS) run -d --rm --name $(CONTAINER) --network host $(CONTAINER_ENV) $(RUN_FLAGS) $(IMAGE)
	@for i in $$(seq $(WAIT_TIMEOUT)); do $(ENGINE) $(ENGINE_FLAGS) exec $(CONTAINER) cat key_file.json > $(SERVE_DIR)/key_file.json 2>/dev/null && break; sleep 1; done
endif
	$(PY) -m visionapp.client.api wait --server $(SERVER) --port $(INFERENCE_PORT) --management-port $(MANAGEMENT_PORT) \
	  --dir $(SERVE_DIR) --model $(MODEL_NAME) --timeout $(WAIT_TIMEOUT) \
	  || { $(ENGINE) $(ENGINE_FLAGS) logs $(CONTAINER) | tail -30; $(ENGINE) $(ENGINE_FLAGS) stop $(CONTAINER); exit 1; }
	@echo "container $(CONTAINER) is serving; make predict IMG=... INFERENCE_PORT=$(INFERENCE_PORT) SERVER=$(SERVER); make image-stop"

image-stop: ## stop the container make image-run started (same INFERENCE_PORT)
	$(ENGINE) $(ENGINE_FLAGS) stop $(CONTAINER)

image-check: need-image ## the image answers one real prediction from a container: image-run, predict IMG, image-stop
	@test -n "$(IMG)" || { echo "usage: make image-check IMAGE=visionapp-serve:1 IMG=photo.png"; exit 2; }
	$(MAKE) image-run
	$(MAKE) predict && $(MAKE) predict V2=1; status=$$?; $(MAKE) image-stop; exit $$status

# KServe images side by side as a node runs them, one container at a time: size, start to ready, c8 throughput
# and resident memory over 1,000 requests of IMAGE_BENCH_DIR's images, answers compared (docs/deploy.md)
IMAGES ?=
IMAGE_BENCH_DIR ?= data/shapes/test
image-bench: need-engine $(STAMP) ## KServe images side by side in containers (IMAGES="visionapp-slim:1 visionapp-kserve:1")
	@test -n "$(IMAGES)" || { echo 'usage: make image-bench IMAGES="visionapp-slim:1 visionapp-kserve:1"'; exit 2; }
	ENGINE_FLAGS="$(ENGINE_FLAGS)" RUN_FLAGS="$(RUN_FLAGS)" $(PY) -m visionapp.bench.images $(IMAGES) --engine $(ENGINE) \
	  --model $(MODEL_NAME) --images-dir $(IMAGE_BENCH_DIR) --out bench/images.json

.PHONY: need-engine need-image base-image base-check image-serve image-serve-torchserve image-serve-kserve image-run image-stop image-check image-bench

# Kubernetes (Deployment, Service, NetworkPolicy, HPA) and KServe (ServingRuntime, InferenceService) for IMAGE,
# rendered from RUN and validated (Kubernetes' schemas, KServe's SDK models) before they are written.
REPLICAS     ?= 2
MAX_REPLICAS ?=
STORAGE_URI  ?=
DEPLOY_DIR   ?= deploy
k8s: need-image server-check $(STAMP) $(if $(filter torchserve,$(SERVER)),$(MODEL_STORE)/$(MODEL_NAME).mar) ## manifests for IMAGE into deploy/ (REPLICAS=2 [SERVER=kserve SLIM=1 EXPLAIN_IMAGE=... CPUS=2 MEM_MB=8192 GPUS=0 STORAGE_URI=... CLIENT_NAMESPACES=... DRYRUN=1])
	$(if $(SLIM),@test -n "$(EXPLAIN_IMAGE)" || { echo "SLIM=1: IMAGE is the slim predictor; name the full image that explains: EXPLAIN_IMAGE=registry.example/visionapp-kserve:1"; exit 2; })
	$(PY) -m visionapp.deploy.manifests --bundle $(RUN)/bundle --mar $(MODEL_STORE)/$(MODEL_NAME).mar --image $(IMAGE) \
	  $(if $(SLIM),--explain-image $(EXPLAIN_IMAGE)) --server $(SERVER) --model-config $(MODEL_CONFIG) --explain-config $(EXPLAIN_CONFIG) \
	  --replicas $(REPLICAS) --cpus $(CPUS) --mem-mb $(MEM_MB) --gpus $(GPUS) --out $(DEPLOY_DIR) \
	  $(if $(MAX_REPLICAS),--max-replicas $(MAX_REPLICAS)) $(if $(STORAGE_URI),--storage-uri $(STORAGE_URI)) $(if $(DRYRUN),--dry-run) \
	  $(if $(CLIENT_NAMESPACES),--client-namespaces $(CLIENT_NAMESPACES))

.PHONY: k8s

# ---- tracking: MLflow's tracking server on this machine (a run logs to it with CONFIG=configs/mlflow.yaml) --------
MLFLOW_PORT ?= 5000
MLFLOW_DIR  ?= runs/mlflow
MLFLOW_URL   = http://127.0.0.1:$(MLFLOW_PORT)
mlflow: $(STAMP) ## MLflow's tracking server on 127.0.0.1:MLFLOW_PORT (SQLite and artifacts in MLFLOW_DIR), in the background
	@mkdir -p $(MLFLOW_DIR)
	@if [ -f $(MLFLOW_DIR)/server.pid ] && kill -0 $$(cat $(MLFLOW_DIR)/server.pid) 2>/dev/null; then \
	  echo "MLflow already runs at $(MLFLOW_URL) (make mlflow-stop)"; exit 0; fi; \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid $(VENV)/bin/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 \
	  --backend-store-uri sqlite:///$(abspath $(MLFLOW_DIR))/mlflow.db --artifacts-destination $(abspath $(MLFLOW_DIR))/artifacts \
	  > $(MLFLOW_DIR)/server.log 2>&1 & echo $$! > $(MLFLOW_DIR)/server.pid; \
	for i in $$(seq 120); do \
	  $(PY) -c "import urllib.request as r; r.urlopen('$(MLFLOW_URL)/health', timeout=2)" 2>/dev/null && break; \
	  kill -0 $$(cat $(MLFLOW_DIR)/server.pid) 2>/dev/null || { tail -20 $(MLFLOW_DIR)/server.log; exit 1; }; sleep 0.5; done; \
	$(PY) -c "import urllib.request as r; r.urlopen('$(MLFLOW_URL)/health', timeout=2)" \
	  || { echo "MLflow did not answer at $(MLFLOW_URL) within a minute; see $(MLFLOW_DIR)/server.log"; exit 1; }
	@echo "MLflow at $(MLFLOW_URL): MLFLOW_TRACKING_URI=$(MLFLOW_URL) make train CONFIG=configs/mlflow.yaml"

mlflow-stop: ## stop the server make mlflow started (its store stays in MLFLOW_DIR)
	@test -f $(MLFLOW_DIR)/server.pid || { echo "no MLflow server started from $(MLFLOW_DIR)"; exit 0; }
	-kill -- -$$(cat $(MLFLOW_DIR)/server.pid) && rm -f $(MLFLOW_DIR)/server.pid  # its process group: the server's workers too

.PHONY: mlflow mlflow-stop

# ---- benchmarks (not part of make test: these machines are noisy, ratios come from one run) ----------------
BENCH_ARGS ?=
bench: $(STAMP) java-check ## every stage vs its peer and ceiling → bench/results.json, docs/bench-results.md (BENCH_ARGS="--rounds 5")
	$(PY) -m visionapp.bench --run $(RUN) --report docs/bench-results.md $(BENCH_ARGS)

bench-train: $(STAMP) ## training alone (ARGS="--device cuda --image-size 224 --batch-size 128 --num-workers 12")
	$(PY) -m visionapp.bench.train $(ARGS)

bench-serve: $(STAMP) java-check ## serving alone at 224 px: in process vs ours vs KServe vs stock TorchServe
	$(PY) -m visionapp.bench.serve --bundle $(RUN)/bundle --image-size 224 --image $$(ls data/shapes/test/star/*.png | head -1) $(ARGS)

.PHONY: bench bench-train bench-serve
