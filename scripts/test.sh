#!/usr/bin/env bash
# On a fresh machine: install cnncodes with its test extras and run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
# Chromium for the browser tests; where it cannot be installed those tests say so and skip.
bash scripts/install-browser.sh || echo "warning: Chromium not installed; the browser tests will skip" >&2
.venv/bin/python -m pytest "$@"
