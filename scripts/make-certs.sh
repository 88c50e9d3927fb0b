#!/usr/bin/env bash
# Make a throw-away CA and certificates for CLUE Edge (see broker/certs.py).
#   scripts/make-certs.sh OUTDIR --nodes n1,n2 [--roles mds,relay,operator] [--host broker.lan] [--days 365] [--force]
# Needs openssl. Uses the project's venv when there is one.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m broker.certs "$@"
