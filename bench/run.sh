#!/bin/sh
# One command on a fresh Debian machine: install Dovecot and the peer tools, set up the venv,
# run the benchmark. Arguments go to bench/run.py, e.g. `sh bench/run.sh --quick --cases P1`.
set -eu
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=""
for pair in dovecot:dovecot-pop3d openssl:openssl mpop:mpop fetchmail:fetchmail getmail:getmail6; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need="$need ${pair#*:}"
done
if [ -n "$need" ]; then
    as_root apt-get update -qq
    # shellcheck disable=SC2086  # one word per package
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq $need </dev/null
fi
extras=
. scripts/venv.sh
# The bench starts a private Dovecot as root (useradd, chown), like the test suite.
if [ "$(id -u)" = 0 ]; then
    exec .venv/bin/python bench/run.py "$@"
fi
exec sudo .venv/bin/python bench/run.py "$@"
