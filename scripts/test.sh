#!/usr/bin/env bash
# On a fresh machine: install cnncodes with its test extras and run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/python -m pytest "$@"
