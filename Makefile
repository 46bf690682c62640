# The README's two set-up commands: `make demo` and `make test`.
# Each creates .venv (Python >= 3.10) on first use and installs the package with what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.comneck-installed

.PHONY: demo test complexity bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "comneck needs Python >= 3.10; set PYTHON=python3.x")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/comneck-demo

test: $(STAMP)
	$(BIN)/python -m pytest

complexity: $(STAMP)
	$(BIN)/comneck complexity

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache
