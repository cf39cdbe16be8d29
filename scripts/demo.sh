#!/usr/bin/env bash
# On a fresh machine: install cnncodes, then do the whole job on the 200 bundled photos (offline
# weights): extract codes, hold out a quarter, fit, evaluate with a confidence interval, predict
# two held-out photos, write demo-report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export CNNCODES_WEIGHTS_PATH="$(bash scripts/offline-weights-path)${CNNCODES_WEIGHTS_PATH:+:$CNNCODES_WEIGHTS_PATH}"
rm -rf cnncodes-demo.h5 cnncodes-demo.h5.d cnncodes-demo.skops demo-report.html
.venv/bin/cnncodes demo -o cnncodes-demo.h5 --model cnncodes-demo.skops --report demo-report.html "$@"
