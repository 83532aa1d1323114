#!/bin/sh
# Set up a venv and run `mailingest demo`: sample mail from a loopback POP3 server, no mailbox needed.
set -eu
cd "$(dirname "$0")/.."
. scripts/venv.sh
exec .venv/bin/mailingest demo
