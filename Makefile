# The two commands a new user needs: `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-deps bench venv compiled clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,compile]'
	@touch $(STAMP)

venv: $(STAMP)

# The hot path compiled with mypyc (tools/compile.py): rebuilt when one of its sources changes. A C compiler and
# the Python headers are installed when missing.
COMPILED_SOURCES := $(wildcard bastion/http/*.py bastion/proxy/*.py bastion/upstream/*.py bastion/observability/*.py)
COMPILED_STAMP := $(VENV)/.compiled
$(COMPILED_STAMP): $(STAMP) $(COMPILED_SOURCES) bastion/__init__.py tools/compile.py tools/compile.ini
	@command -v gcc >/dev/null && $(BIN)/python -c "import sysconfig,os,sys; sys.exit(not os.path.exists(sysconfig.get_paths()['include']+'/Python.h'))" \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev python3-dev; }
	$(BIN)/python tools/compile.py build_ext --inplace > $(VENV)/compile.log 2>&1 || { tail -20 $(VENV)/compile.log; exit 1; }
	@touch $@

compiled: $(COMPILED_STAMP)

run: compiled
	./examples/run-demo.sh

# Everything the tests need that is not a Python package: installed when missing.
# dnsmasq's package starts a system DNS service: the tests run their own, so that one is stopped.
TEST_APT := curl dnsmasq pebble openssl redis-server libmodsecurity3 modsecurity-crs nghttp2-client
test-deps: venv
	@missing=""; for p in $(TEST_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  (systemctl stop dnsmasq || service dnsmasq stop || true) >/dev/null 2>&1; fi

test: test-deps compiled
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: compiled
	bash bench/run.sh

clean:
	rm -rf $(VENV) build *.egg-info
	find bastion -name '*.so' -delete
