#!/bin/sh
# Install what the tests need (Dovecot and PostgreSQL included), set up a venv, run the suite.
# Extra arguments go to pytest, e.g. `sh scripts/test.sh -k fetch` (`-n 0`: in one process).
set -eu
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v dovecot >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1 \
    || ! command -v systemd-analyze >/dev/null 2>&1 \
    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq dovecot-pop3d openssl systemd postgresql
fi
extras=test,dev
. scripts/venv.sh
exec .venv/bin/python -m pytest -n auto "$@"
