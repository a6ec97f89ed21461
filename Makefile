# pdserve: `make run` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=
IMAGE ?= pdserve:latest

.PHONY: setup system-deps python-deps run test lint bench image

setup: system-deps python-deps

# Mooncake's transfer engine links against the RDMA user-space libraries, even for TCP; the
# engine's native CPU kernels (engine/kernels) are compiled with the system C compiler, OpenMP on.
system-deps:
	@if ! ldconfig -p | grep -q libibverbs.so.1 || ! ldconfig -p | grep -q librdmacm.so.1 \
			|| ! printf '#include <stdint.h>\nint main(void) { return 0; }\n' \
				| cc -fopenmp -x c - -o /dev/null >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
			libibverbs1 ibverbs-providers librdmacm1 gcc libc6-dev >/dev/null; \
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

# The local cluster from the embedded default (configs/local-cpu.yaml): 1 prefill + 1 decode +
# the gateway on 127.0.0.1:30000, a tiny generated model. Ctrl-C stops everything.
run: setup
	$(PYTHON) -m cluster.cli launch

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

bench: setup
	$(PYTHON) scripts/bench_offline.py

# The CPU container image (docker/Dockerfile.cpu; docker/Dockerfile.cuda for GPU machines), for
# `pdserve k8s --image`. Not part of `make test`: it needs a container daemon.
image:
	docker build -f docker/Dockerfile.cpu -t $(IMAGE) .
