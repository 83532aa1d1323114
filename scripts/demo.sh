#!/bin/sh
# Set up a venv and run `mailingest demo`: sample mail from a loopback POP3 server, no mailbox needed.
# `sh scripts/demo.sh postgresql`: the same demo on a private PostgreSQL (installed if missing).
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" = postgresql ]; then
    as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql
    fi
    extras=postgresql
    . scripts/venv.sh
    exec .venv/bin/python scripts/demo_postgres.py
fi
extras=
. scripts/venv.sh
exec .venv/bin/mailingest demo
