#!/bin/sh
# Create .venv (once) and install mailingest into it; sourced by demo.sh, test.sh,
# bench/run.sh and .ci/run.
# usage: extras=EXTRAS; . scripts/venv.sh   e.g. "extras=test,dev; . scripts/venv.sh"
# (a variable, not an argument: Debian's sh, dash, gives `.` no arguments of its own, so the
# sourced file would read the caller's $1 instead)
set -eu
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian ships venv support separately.
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
extras=${extras:-}
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ -n "$extras" ]; then
    .venv/bin/python -m pip install -q -e ".[$extras]"
else
    .venv/bin/python -m pip install -q -e .
fi
