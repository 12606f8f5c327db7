#!/usr/bin/env bash
# The GPU suite: on a fresh CUDA machine with torch, triton and timm preinstalled and no
# network, install mimfast without dependencies, run the whole test suite compiled on the GPU,
# then the benchmarks. Writes warm.log, tests.log, tests.xml, results.json, results.md and
# step.png to OUT and prints a short table last. Budget: under 9 minutes on an H100 (every
# kernel specialisation compiled into Triton's cache in parallel first, up to 100 s; tests up
# to 180 s; benchmarks in --quick mode until 200 s are spent).
#
#   bash benchmarks/gpu_suite.sh OUT_DIR                      # tests + all benchmarks (quick)
#   bash benchmarks/gpu_suite.sh OUT_DIR step,beit full       # named benchmarks, all cases, no tests
set -u
OUT=${1:-${OUT:-benchmarks/results/latest}}
ONLY=${2:-}
MODE=${3:-quick}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; }
export MIMFAST_TEST_DEVICE=cuda
# compile every kernel specialisation the tests and benchmarks launch, 16 at a time, into
# Triton's cache: the runtime then loads them instead of compiling one by one
timeout 100 python -m benchmarks.compile_check --warm --jobs "$(nproc)" > "$OUT/warm.log" 2>&1
echo "cache warm-up exit code: $? (124: cut at 100 s)"; tail -1 "$OUT/warm.log"
if [ -z "$ONLY" ]; then
  timeout 180 python -m pytest tests -q -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  echo "tests exit code: $? (124: cut at 180 s)"
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
fi
QUICK=""
[ "$MODE" = "quick" ] && QUICK="--quick"
timeout 240 python -m benchmarks.run --out "$OUT" ${ONLY:+--only "$ONLY"} $QUICK --budget-s 200
echo "benchmarks exit code: $?"
