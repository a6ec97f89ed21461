# pdserve: `make run` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

.PHONY: setup system-deps python-deps run test lint bench

setup: system-deps python-deps

# Mooncake's transfer engine links against the RDMA user-space libraries, even for TCP.
system-deps:
	@if ! ldconfig -p | grep -q libibverbs.so.1 || ! ldconfig -p | grep -q librdmacm.so.1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			libibverbs1 ibverbs-providers librdmacm1 >/dev/null; \
	fi

# torch first, so nothing that depends on it pulls another build; CPU machines take the
# CPU build of torch 2.13.0 and the non-CUDA transfer engines.
python-deps:
ifeq ($(HAS_GPU),1)
	$(PIP) install -q torch
	$(PIP) install -q -e ".[gpu,test]"
else
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,test]"
	$(PIP) install -q --no-deps nixl-cu12
endif

# Until the cluster lands: the offline engine on the default tiny model.
DEFAULT_MODEL ?= $(HOME)/.cache/pdserve/models/default-qwen3
run: setup
	@test -f $(DEFAULT_MODEL)/config.json || \
		$(PYTHON) -m cluster.cli make-model --arch qwen3 --out $(DEFAULT_MODEL)
	$(PYTHON) -m cluster.cli generate --model $(DEFAULT_MODEL) --json --max-tokens 24 \
		--prompt "The quick brown fox" --prompt "Prefill and decode, disaggregated:"

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench: setup
	$(PYTHON) scripts/bench_offline.py
