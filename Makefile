# Two commands on a fresh machine: `make demo` (main job end to end) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Without a GPU DeepSpeed must be told to use its CPU accelerator (gloo, no CUDA).
export DS_ACCELERATOR ?= cpu
# Ray otherwise prints one line per worker per log call; keep the demo readable.
export RAY_DEDUP_LOGS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
# DeepSpeed's JIT-built C++ ops live with the environment that built them: torch reuses a build only
# while its ninja file, which names the environment's absolute paths, is unchanged, so two checkouts
# sharing ~/.cache would rebuild over each other (minutes each time).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install libaio ops demo test test-fast test-cluster test-all bench bench-gpu clean

install: $(VENV)/.installed libaio ops

# DeepSpeed's async_io op (NVMe offload: train.deepspeed.offload_*=nvme) is built from libaio's headers.
# Skipped when they are present; installed with apt-get when this user is root; otherwise said (NVMe
# offload is then refused in one line before training, everything else works).
libaio:
	@if [ -e /usr/include/libaio.h ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing libaio-dev (DeepSpeed NVMe offload)"; \
	  apt-get install -y -qq libaio-dev >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libaio-dev >/dev/null; } \
	  || echo "note: libaio-dev could not be installed: NVMe offload will be refused"; \
	else echo "note: libaio-dev is missing (as root: apt-get install libaio-dev): NVMe offload will be refused"; fi

# Built once per environment here (about 5 minutes on 2 cores), seconds when already built: not in the
# first training run or test.
ops: $(VENV)/.installed libaio
	@$(BIN)/python -m training.runtime.jit_ops

# torch==2.13.0 first: it resolves to the local CPU wheel here; letting another package pull an
# unpinned torch would fetch GBs of CUDA libraries.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (a few minutes on a fresh machine)"
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq -c constraints.txt torch
	$(BIN)/pip install -qq -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(BIN)/python -m pipelines.demo

# CI's suite. The `cluster` tests (killed workers, nodes, drivers and jobs; flows end to end on the local
# stack) take about 45 minutes more on 2 cores: `make test-cluster` runs them, `make test-all` everything.
test: install
	$(BIN)/python -m pytest -q -m "not cluster"

test-cluster: install
	$(BIN)/python -m pytest -q -m cluster

test-all: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m bench.run

# The GPU plan (bench/GPU.md) on a machine with a CUDA GPU; on a lent machine without the venv:
# bash bench/gpu_device.sh
bench-gpu: install
	$(BIN)/python -m bench.run --gpu --device cuda

clean:
	rm -rf runs .pytest_cache
