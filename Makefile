# The two commands a new user needs: `make run` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-deps bench venv clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

run: venv
	./examples/run-demo.sh

# Everything the tests need that is not a Python package: installed when missing.
# dnsmasq's package starts a system DNS service: the tests run their own, so that one is stopped.
TEST_APT := curl dnsmasq pebble openssl redis-server libmodsecurity3 modsecurity-crs nghttp2-client
test-deps: venv
	@missing=""; for p in $(TEST_APT); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  (systemctl stop dnsmasq || service dnsmasq stop || true) >/dev/null 2>&1; fi

test: test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: venv
	bash bench/run.sh

clean:
	rm -rf $(VENV) build *.egg-info
