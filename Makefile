# Two commands do all the set-up: `make train` (the main job) and `make test`.
# Both create .venv on first use and install mgqa into it (editable); later runs reuse it and
# reinstall only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist): the suite is mostly subprocess runs and Triton's interpreter, one core each.
TEST_WORKERS ?= auto
# One CPU thread per test process and its subprocesses where several run: the workers already fill
# the cores, and torch's OpenMP threads, oversubscribed, spin-wait against each other. A single
# process (TEST_WORKERS=1) keeps torch's default, every core.
TEST_THREADS ?= 1

.PHONY: install train test test-gpu bench-attention clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## The main job: train the default GQA model on the embedded corpus (CPU or GPU), e.g. `make train ARGS="model.kv_heads=1"`
train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

## The test suite (CPU; Triton kernels run in the interpreter; GPU tests are skipped without CUDA)
test: $(STAMP)
	$(if $(filter 1,$(TEST_WORKERS)),,OMP_NUM_THREADS=$(TEST_THREADS)) $(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

## GPU-only tests, on a machine with CUDA
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

bench-attention: $(STAMP)
	$(BIN)/python bench/attention.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
