# Two commands on a fresh machine:  make demo   and   make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch that lies on these machines; elsewhere pip resolves torch>=2.5 normally.
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test lint bench bench-quick clean

$(BIN)/leanmerge: pyproject.toml setup.py $(wildcard engine/stats/csrc/*.c engine/stats/csrc/*.h)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_CPU)" || echo "no local $(TORCH_CPU) wheel; pip will pick torch>=2.5"
	$(BIN)/pip install -q -e ".[test,bench,fast]"
	touch $@

demo: $(BIN)/leanmerge
	$(BIN)/python tools/demo.py

test: $(BIN)/leanmerge
	$(BIN)/ruff check engine tests tools bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -p no:cacheprovider

lint: $(BIN)/leanmerge
	$(BIN)/ruff check engine tests tools bench
	$(BIN)/ruff format --check engine tests tools bench
	$(BIN)/mypy

bench-quick: $(BIN)/leanmerge
	$(BIN)/python -m bench --quick

bench: $(BIN)/leanmerge
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .demo
