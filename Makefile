# The README's two set-up commands: `make demo` and `make test`.
# Each creates .venv (Python >= 3.10) on first use and installs the exact versions of the lock,
# then the project itself without dependencies: `make test` requirements/dev.txt (everything),
# `make demo` only what the demo runs (requirements/server.txt and edge.txt), or nothing more
# when .venv already holds the dev set.
# `make lock` updates the lock files to pyproject.toml's ranges, keeping every pin that still fits;
# `make lock UPGRADE=1` moves every package to its newest allowed release (then run `make test`).
# Both also write requirements/{edge,server}-cpu.txt: the same pins with PyTorch's CPU-only build
# (requirements/edge-lite.txt, the ONNX Runtime edge, holds no torch and needs no such variant).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.comneck-installed
DEMO_STAMP := $(VENV)/.comneck-demo-installed
LOCK_TOOL := .venv-lock
UV_VERSION := 0.13.9
LOCK_SETS := edge edge-lite server train llm eval dev
UV_COMPILE = $(LOCK_TOOL)/bin/uv pip compile pyproject.toml --universal --python-version 3.10 \
	--no-emit-package comneck --custom-compile-command "make lock" --quiet

.PHONY: demo test complexity bench lock clean

define install
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "comneck needs Python >= 3.10; set PYTHON=python3.x")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(1)
	$(BIN)/python -m pip install --no-deps -e .
	touch $@
endef

$(STAMP): requirements/dev.txt pyproject.toml
	$(call install,-r requirements/dev.txt)

$(DEMO_STAMP): requirements/server.txt requirements/edge.txt pyproject.toml
	$(call install,-r requirements/server.txt -r requirements/edge.txt)

demo: $(if $(wildcard $(STAMP)),$(STAMP),$(DEMO_STAMP))
	$(BIN)/comneck-demo

test: $(STAMP)
	$(BIN)/python -m pytest

complexity: $(STAMP)
	$(BIN)/comneck complexity

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py

# dev is resolved first; the smaller sets are resolved inside it, so every set agrees on versions.
lock:
	test -x $(LOCK_TOOL)/bin/uv || ($(PYTHON) -m venv $(LOCK_TOOL) && $(LOCK_TOOL)/bin/python -m pip install "uv==$(UV_VERSION)")
	$(UV_COMPILE) $(if $(UPGRADE),--upgrade) --extra dev -c requirements/constraints.txt -o requirements/dev.txt
	for set in $(filter-out dev,$(LOCK_SETS)); do \
		$(UV_COMPILE) --extra $$set -c requirements/constraints.txt -c requirements/dev.txt -o requirements/$$set.txt || exit 1; \
	done
	$(PYTHON) requirements/cpu_lock.py

clean:
	rm -rf $(VENV) $(LOCK_TOOL) .pytest_cache
