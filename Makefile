# Two commands on a fresh machine: `make demo` (synthetic data, a few minutes) and
# `make test`. `make run` runs the real pipeline on FER2013 in data/raw/.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
SHARED_ZIP := ../shared/data/fer2013-train-publictest.zip
# tests/test_real_data.py runs on the shared FER2013 archive when it is there (as in CI);
# FER2013_ZIP=/path/to/archive.zip make test points it elsewhere.
ifneq ($(wildcard $(SHARED_ZIP)),)
export FER2013_ZIP ?= $(abspath $(SHARED_ZIP))
endif

.PHONY: install test test-fast demo gpu-check run data clean-demo report release

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Each test runs on one thread (tests/conftest.py), so the suite runs a worker per core
# (pytest-xdist), a module at a time per worker so that its trained fixtures are built
# once; TEST_WORKERS=0 runs it in series, e.g. beside a training.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

test: install
	$(PYTEST)

# The inner loop: everything but the end-to-end stage runs (marked slow).
test-fast: install
	$(PYTEST) -m "not slow"

demo: install
	$(PY) -m ferpipe.tools.demo

# The GPU path on a synthetic set: device auto, bf16 where the GPU has it, DDP over NCCL with
# 2+ GPUs; prints training images/s and fails if the GPU was not used as asked.
gpu-check: install
	$(PY) -m ferpipe.tools.gpu_check

# Copy the shared FER2013 archive into data/raw/ when it is there and nothing else is. A copy,
# not a symbolic link: prepare refuses links that point out of the raw folder. An older
# checkout's link to it is replaced by a copy.
SHARED_NAME := $(notdir $(SHARED_ZIP))
data:
	mkdir -p data/raw
	@if [ -L data/raw/$(SHARED_NAME) ] && [ -f $(SHARED_ZIP) ]; then \
		cp --remove-destination $(SHARED_ZIP) data/raw/ && echo "replaced the link data/raw/$(SHARED_NAME) by a copy"; \
	elif [ -z "$$(ls -A data/raw)" ] && [ -f $(SHARED_ZIP) ]; then \
		cp $(SHARED_ZIP) data/raw/ && echo "copied $(SHARED_ZIP) into data/raw/"; fi

run: install data
	dvc repro

# The release model (release/recipe.yaml) trained in a clone, build/release/, and copied into
# release/ with its model card; hours on a CPU (docs/benchmarks.md). THREADS=N sets
# runtime.threads for it. Rerun to resume after an interruption.
THREADS ?= 0
release: install data
	$(PY) -m ferpipe.tools.build_release --threads $(THREADS)

# One self-contained HTML page of the run in this folder (after dvc repro): report.html,
# git-ignored, viewable offline (images inlined, no scripts).
report: install
	$(PY) -m ferpipe.tools.report --out report.html

clean-demo:
	rm -rf demo
