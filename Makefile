# Two commands do everything: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU users: `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" demo`
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test bench repro clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

$(STAMP): $(PY) pyproject.toml
	@# Install torch first (CPU wheel on this machine) unless one is already present,
	@# so the resolver never pulls a multi-GB CUDA build for a plain `torch` requirement.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	@# byte-code of the project's own packages (pip compiles the dependencies; imports never write it
	@# where PYTHONDONTWRITEBYTECODE is set, and every Ray worker process imports these)
	$(PY) -m compileall -q orchestrator trainers search
	$(PY) -m pip freeze > $(VENV)/resolved.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/denoiselab train orchestrator/experiments/quickstart.yaml

# `make test`: the integration tests that use Ray (real services, in file order) and, beside them
# in a second process, the unit, method and GPU tests and the integration tests that start no Ray
# (their report follows). With PYTEST_ARGS (paths, -k, -m ...) it is one plain pytest run.
BESIDE := tests/integration/test_fail_fast.py tests/integration/test_data_cli.py \
	tests/integration/test_concurrent_tracking.py
test: $(STAMP)
ifeq ($(strip $(PYTEST_ARGS)),)
	@$(PY) -m pytest -q -ra -p no:cacheprovider tests/unit tests/methods tests/gpu $(BESIDE) \
	  > $(VENV)/unit-tests.log 2>&1 & \
	  unit=$$!; $(PY) -m pytest -q -ra --durations=12 tests/integration $(addprefix --ignore=,$(BESIDE)); integration=$$?; \
	  wait $$unit; units=$$?; \
	  echo "== tests/unit, tests/methods, tests/gpu and $(BESIDE) (run beside the others)"; \
	  cat $(VENV)/unit-tests.log; test $$integration -eq 0 -a $$units -eq 0
else
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)
endif

bench: $(STAMP)
	$(PY) benchmarks/method_overhead.py
	$(PY) benchmarks/ray_overhead.py
	$(PY) benchmarks/dmp.py
	$(PY) benchmarks/meme.py
	$(PY) benchmarks/latents.py
	$(PY) benchmarks/checkpoint.py --model DiT-S/2

# The five-paper reproduction (benchmarks/repro/README.md): about 90 minutes on 2 cores; resumable.
repro: $(STAMP)
	bash benchmarks/repro/run.sh

clean:
	rm -rf $(VENV) runs mlflow.db .pytest_cache
