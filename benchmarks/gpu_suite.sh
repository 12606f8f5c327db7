#!/usr/bin/env bash
# The GPU suite: on a fresh CUDA machine with torch, triton and timm preinstalled and no
# network, install mimfast without dependencies, run the whole test suite compiled on the GPU,
# then the benchmarks. Writes gpu.txt, install.log, warm.log, tests.log, tests.xml,
# host_overhead.json / .log, results.json, results.md and step.png to OUT (10 files) and prints a
# short table last.
# Budget: SUITE_S seconds in all (default 540, 9 minutes): every kernel specialisation compiled
# into Triton's cache in parallel first (up to 100 s), the tests (up to 200 s, in four
# processes where pytest-xdist is installed), the host's cost per op call (up to 40 s), then the
# benchmarks in --quick mode with whatever is left (about 190 s when the steps before take
# their whole share): no module starts in the last 40 s, and a timeout 10 s before the end
# stops the one running (its rows so far are kept: results are saved after every row).
#
#   bash benchmarks/gpu_suite.sh OUT_DIR                      # tests + all benchmarks (quick)
#   bash benchmarks/gpu_suite.sh OUT_DIR step,beit full       # named benchmarks, all cases, no tests
#   SUITE_S=200 bash benchmarks/gpu_suite.sh OUT_DIR masking,patch_loss,beit,fusions   # a second call
set -u
OUT=${1:-${OUT:-benchmarks/results/latest}}
ONLY=${2:-}
MODE=${3:-quick}
SUITE_S=${SUITE_S:-540}
PY=${PYTHON:-python3}  # the image's python3 is the one that holds PyTorch
export PYTHONUNBUFFERED=1  # a run cut by a timeout still shows what it printed
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
timeout 20 nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$OUT/gpu.txt" 2>&1
timeout 90 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -20 "$OUT/install.log"; }
export MIMFAST_TEST_DEVICE=cuda
# compile every kernel specialisation the tests and benchmarks launch, 16 at a time, into
# Triton's cache: the runtime then loads them instead of compiling one by one
timeout -k 5 100 "$PY" -m benchmarks.compile_check --warm --jobs "$(nproc)" > "$OUT/warm.log" 2>&1
echo "cache warm-up exit code: $? (124: cut at 100 s)"; tail -1 "$OUT/warm.log"
# the image has pytest-xdist and pytest-timeout: four test processes share the GPU (the suite's
# tensors are small; launches and Python dominate), and a hung test fails alone after 120 s
PYTEST_OPTS=""
"$PY" -c "import xdist" 2> /dev/null && PYTEST_OPTS="$PYTEST_OPTS -n 4"
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST_OPTS="$PYTEST_OPTS --timeout 120"
if [ -z "$ONLY" ]; then
  # SIGINT at the limit: pytest stops, ends its workers and still prints the summary of what ran
  # (the third H200 run's slower host cut the tests at 180 s just before the summary line)
  timeout -s INT -k 15 200 "$PY" -m pytest tests -q -p no:cacheprovider $PYTEST_OPTS --junitxml="$OUT/tests.xml" \
    > "$OUT/tests.log" 2>&1
  echo "tests exit code: $? (124 or 2: cut at 200 s)"
  grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
fi
# the host's cost per op call with real launches (benchmarks/host_overhead.py): how close each op
# is to launch-bound at MAE ViT-B shapes; at most 40 s, skipped in calls that name benchmarks
if [ -z "$ONLY" ]; then
  # (no tuning: the whole-step row's B = 8 shapes would be timed first, for nothing but this)
  MIMFAST_AUTOTUNE=0 timeout -k 5 40 "$PY" -m benchmarks.host_overhead --device cuda --n 50 --repeat 3 \
    --json "$OUT/host_overhead.json" > "$OUT/host_overhead.log" 2>&1
  echo "host overhead exit code: $? (124: cut at 40 s)"
fi
QUICK=""
[ "$MODE" = "quick" ] && QUICK="--quick"
LEFT=$((SUITE_S - SECONDS - 10))
if [ "$LEFT" -lt 60 ]; then
  echo "benchmarks not run: only $LEFT s of the suite's $SUITE_S s left"
  exit 1
fi
echo "benchmarks: $LEFT s (no module starts after $((LEFT - 40)) s)"
timeout -k 5 "$LEFT" "$PY" -m benchmarks.run --out "$OUT" ${ONLY:+--only "$ONLY"} $QUICK --budget-s $((LEFT - 40))
echo "benchmarks exit code: $? (124: cut at $LEFT s)"
