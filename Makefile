# Two entry points for people: `make demo` and `make test`. Both build the venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.specbridge-installed
# Idle OpenMP workers sleep instead of spinning: on a few cores shared by the verifier, the
# edge draft and the tests, spinning threads starve everything else.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install system-packages proto demo test test-fast models clean

install: $(STAMP)

# torch first, from the pinned CPU wheel, so that nothing later resolves a CUDA build.
$(STAMP): pyproject.toml proto/generate.py proto/specbridge/v1/specbridge.proto
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[edge,verifier,export,models,tokenizers,bench,dev]'
	$(PY) proto/generate.py
	@$(MAKE) --no-print-directory system-packages
	@touch $(STAMP)

# Debian's nginx: tests/deploy runs the real binary as the verifiers' gRPC load balancer. Never assumed present;
# the package's own service is not used (each test starts nginx with its own prefix).
system-packages:
	@if test -x /usr/sbin/nginx || command -v nginx >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; \
	elif sudo -n true 2>/dev/null; then sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; \
	else echo "make: nginx is missing and neither root nor passwordless sudo can install it: skipped" \
	  "(tests/deploy skip without it, and fail under CI=true); install it with: apt-get install nginx"; fi

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
