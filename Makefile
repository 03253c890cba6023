# metarun — `make help` lists the targets. Every target sets itself up: it creates .venv and
# installs metarun (editable) on first use, so a fresh clone needs only `make test` or `make run`.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
# pytest workers for `make test` (pytest-xdist): the suite is mostly metarun subprocesses and small
# single-threaded trainings, so 2 workers on 2 cores take it from ~12 to ~7 minutes; TEST_WORKERS=0 runs it in one
TEST_WORKERS ?= 2
# the shared datasets, where a checkout has them beside it (CI does); else metarun's default ./data
export METARUN_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),$(abspath data))

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow test-cuda lint bench gpu-pack clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned in setup.cfg (torch==2.13.0): never let pip pick a torch by itself
	$(PY) -m pip install -q -e '.[dev,cluster,search]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install metarun with its test tools, launchers and search
	@echo "installed: $(VENV)/bin/metarun"

run: $(STAMP) ## train and evaluate sinusoid MAML (overrides: make run ARGS="experiment=sinusoid_k5")
	$(VENV)/bin/metarun $(ARGS)

test: $(STAMP) ## the default test suite (everything but tests marked slow or cuda)
	$(PY) -m pytest -m "not slow and not cuda" -n $(TEST_WORKERS) --dist worksteal $(ARGS)

test-slow: $(STAMP) ## only the slow tests (long training runs)
	$(PY) -m pytest -m slow $(ARGS)

test-cuda: $(STAMP) ## only the tests that need a CUDA GPU (the CUDA graph, the harness on cuDNN)
	$(PY) -m pytest -m cuda $(ARGS)

lint: $(STAMP) ## ruff over the code and tests
	$(VENV)/bin/ruff check metarun tests parity

bench: $(STAMP) ## speed and memory, vmap vs loop; meta-RL steps/s (ARGS="--configs sinusoid --rl" for one)
	$(PY) -m metarun.bench $(ARGS)

gpu-pack: $(STAMP) ## put into .gpu/ what an offline GPU machine needs for .ci/gpu-check (docs/development.md)
	rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data/omniglot
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/wheels \
		hydra-core==1.3.8 omegaconf==2.3.1
	$(PY) -m pip wheel -q --no-deps -w .gpu/wheels antlr4-python3-runtime==4.9.3
	# meta-RL there: MuJoCo and gymnasium with what they import (about 11 MB; mujoco-studio is not imported)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		--platform manylinux_2_28_x86_64 -d .gpu/wheels mujoco==4.0.0 mujoco-core==4.0.0 gymnasium==1.4.0 \
		cloudpickle==3.1.3 farama-notifications==0.0.6 glfw==2.11.0
	cp $(METARUN_DATA_DIR)/omniglot/images_background.zip $(METARUN_DATA_DIR)/omniglot/images_evaluation.zip \
		.gpu/data/omniglot/
	@du -sh .gpu

clean: ## remove the virtual environment and caches (keeps outputs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
