#!/usr/bin/env bash
# The wheel check of .ci/run, from a fresh clone too: sets up .venv first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make setup
exec .venv/bin/python scripts/check_wheel.py "$@"
