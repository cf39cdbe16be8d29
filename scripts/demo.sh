#!/usr/bin/env bash
# On a fresh machine: install cnncodes and extract codes of the bundled photos (offline weights).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export CNNCODES_WEIGHTS_PATH="$(bash scripts/offline-weights-path)${CNNCODES_WEIGHTS_PATH:+:$CNNCODES_WEIGHTS_PATH}"
rm -f cnncodes-demo.h5
.venv/bin/cnncodes demo -o cnncodes-demo.h5 "$@"
