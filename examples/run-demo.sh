#!/usr/bin/env bash
# `make run`: two demo backends and Bastion on examples/quickstart.yaml. Ctrl-C stops all of it.
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
pids=()
cleanup() {
  trap - INT TERM EXIT
  [ -n "${bastion_pid:-}" ] && kill -TERM "$bastion_pid" 2>/dev/null
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
}
trap cleanup INT TERM EXIT
$PY examples/demo_backend.py 9001 demo-1 & pids+=($!)
$PY examples/demo_backend.py 9002 demo-2 & pids+=($!)
echo "Bastion: http://127.0.0.1:8080/  (admin: http://127.0.0.1:9090/metrics)  Ctrl-C to stop"
.venv/bin/bastion run -c examples/quickstart.yaml &
bastion_pid=$!
wait "$bastion_pid"
