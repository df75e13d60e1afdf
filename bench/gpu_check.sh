#!/bin/sh
# bench/gpu_check.sh [--json] [--cull 24h]: labfleet's GPU facts on this machine, against its real
# driver (bench/gpu_check.py says what it runs and what its exit status means). No network: it uses
# the checkout's .venv (./run makes it once), or a python3 that has pyinfra.
set -eu
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" -m bench.gpu_check "$@"
