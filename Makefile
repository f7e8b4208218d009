# Two entry points for people: `make demo` and `make test`. Both build the venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.specbridge-installed
# Idle OpenMP workers sleep instead of spinning: on a few cores shared by the verifier, the
# edge draft and the tests, spinning threads starve everything else.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install proto demo test test-fast models clean

install: $(STAMP)

# torch first, from the pinned CPU wheel, so that nothing later resolves a CUDA build.
$(STAMP): pyproject.toml proto/generate.py proto/specbridge/v1/specbridge.proto
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[edge,verifier,export,models,tokenizers,bench,dev]'
	$(PY) proto/generate.py
	@touch $(STAMP)

proto: install
	$(PY) proto/generate.py

models: install
	$(VENV)/bin/specbridge models prepare

demo: install
	$(VENV)/bin/specbridge models prepare
	$(VENV)/bin/specbridge demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) specbridge/v1 .pytest_cache .hypothesis
