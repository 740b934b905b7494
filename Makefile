# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment in .venv on first use (Python >= 3.11).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint install clean

install: $(VENV)/.installed

# The demo needs the package only; the tests add their extras (torch and transformers' PyTorch Llama as the
# reference, xgrammar, pytest) on top, so `make demo` does not spend its budget installing them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/reclm-jax data stats --dataset ml-100k
	$(BIN)/reclm-jax pipeline --config configs/pipeline/demo.yaml

# lint-imports checks the layering contract in pyproject.toml ([tool.importlinter]) before any test runs.
lint: $(VENV)/.installed-test
	$(BIN)/lint-imports

# Two workers (a 2-core machine; TEST_WORKERS=0 runs in one process), each given whole test modules, so a module's
# fixtures are built once; the compiled programs are shared between them through tests/conftest.py's cache.
TEST_WORKERS ?= 2

# Most of the suite's programs are tiny models' and cost more to compile than to run, so XLA's CPU compiler is told
# to skip LLVM optimisation and use its older loop emitters: the same HLO, ~2.8x less compile CPU, slower code.
# Every comparison in a test runs both sides under the same flags; the planned-memory test (tests/test_scale.py)
# measures a training step compiled as users get it, in a subprocess without them.
FAST_COMPILE := --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true \
	--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1

test: lint
	XLA_FLAGS="$(XLA_FLAGS) $(FAST_COMPILE)" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# The inner loop: everything but the tests marked slow (subprocess meshes, real weights end to end).
test-fast: lint
	XLA_FLAGS="$(XLA_FLAGS) $(FAST_COMPILE)" $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
