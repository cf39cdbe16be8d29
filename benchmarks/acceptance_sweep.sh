#!/usr/bin/env bash
# Acceptance of the layer sweep and the advisor (issue 4): flowers5 and sklearn's digits.
#
#   bash benchmarks/acceptance_sweep.sh ../shared/datasets/flowers5 OUT_DIR
#
# Writes OUT_DIR/*.txt (each command's output, timed) and OUT_DIR/*.png (sweep plots).
# Stores are kept in OUT_DIR, so a second run re-uses every code and only re-probes.
set -euo pipefail
FLOWERS=${1:?usage: acceptance_sweep.sh FLOWERS5_DIR OUT_DIR}
OUT=${2:?usage: acceptance_sweep.sh FLOWERS5_DIR OUT_DIR}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
export CNNCODES_WEIGHTS_PATH=${CNNCODES_WEIGHTS_PATH:-$(bash "$HERE/scripts/offline-weights-path")}
export CNNCODES_OFFLINE=1

run() {  # run NAME COMMAND...: print and time a command, keep its output in OUT/NAME.txt
  local name=$1; shift
  echo "\$ $*" | tee "$OUT/$name.txt"
  /usr/bin/time -f "wall %e s, peak RSS %M KB" "$@" 2>&1 | grep -v '^\s*$' | tee -a "$OUT/$name.txt"
}

# (a) flowers5: one extraction pass over block1..block5, a 5-fold probe per layer.
run flowers5-sweep cnncodes sweep "$FLOWERS" --store "$OUT/flowers5.h5" --plot "$OUT/flowers5-sweep.png" --quiet

# (b) digits: 1,797 8x8 digits upsampled 8x to 64 px PNGs, swept at 64 px (their own size),
# at 32 px and at the weights' 224 px.
python "$HERE/examples/digits_folder.py" "$OUT/digits" --size 64
run digits-sweep-64 cnncodes sweep "$OUT/digits" --image-size 64 --store "$OUT/digits64.h5" --plot "$OUT/digits-sweep-64.png" --quiet
run digits-sweep-32 cnncodes sweep "$OUT/digits" --image-size 32 --store "$OUT/digits32.h5" --plot "$OUT/digits-sweep-32.png" --quiet
run digits-sweep-224 cnncodes sweep "$OUT/digits" --store "$OUT/digits224.h5" --plot "$OUT/digits-sweep-224.png" --quiet

# (c) the advice on both (their sweeps re-use the stores above).
run flowers5-advise cnncodes advise "$FLOWERS" --store "$OUT/flowers5.h5" --quiet
run digits-advise-64 cnncodes advise "$OUT/digits" --image-size 64 --store "$OUT/digits64.h5" --quiet
run digits-advise-224 cnncodes advise "$OUT/digits" --store "$OUT/digits224.h5" --quiet
