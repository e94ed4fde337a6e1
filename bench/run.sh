#!/usr/bin/env bash
# `make bench`: installs what it needs (Debian's nginx and its ModSecurity module, CRS, haproxy, wrk, h2load;
# Bastion's virtualenv) and runs
# bench/bench.py. Not part of `make test`. BENCH_QUICK=1 for a short run while developing.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=""
for tool in nginx:nginx-light haproxy:haproxy wrk:wrk h2load:nghttp2-client taskset:util-linux openssl:openssl curl:curl; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing="$missing ${tool#*:}"
done
# The WAF scenario: libmodsecurity3 and CRS for Bastion, and nginx's ModSecurity module for the comparison.
for pkg in libmodsecurity3 modsecurity-crs libnginx-mod-http-modsecurity; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
fi
[ -x .venv/bin/bastion ] || make venv
exec .venv/bin/python bench/bench.py "$@"
