#!/usr/bin/env bash
# Everything the GPU machine runs for a results file, in one call (device time is scarce):
#   GPU tests, compute-sanitizer over the merge GPU tests, the self-check, the roofline bench against vLLM's
#   anchor kernels and the pytest-benchmark suite. Logs and JSON go to $OUT (default bench/results/latest).
# Usage (repository root, the vLLM anchor copied to .anchors/):  CUPY_OPS_GIT_SHA=<sha> bash bench/run_device.sh
set -uo pipefail
OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUPY_OPS_CACHE_DIR="${CUPY_OPS_CACHE_DIR:-$(mktemp -d)}"
ANCHOR=".anchors/vllm-0.33.0-C_stable_libtorch-sm90.so.xz"
status=0

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -m cupy_ops info | tee -a "$OUT/gpu.txt"

echo "== tests (GPU and CPU)"
python3 -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -n 25 || status=1

echo "== compute-sanitizer memcheck over the merge GPU tests"
compute-sanitizer --tool memcheck --error-exitcode 99 --target-processes all \
    python3 -m pytest tests/test_merge_gpu.py -q -p no:cacheprovider -k "not large_offsets" \
    > "$OUT/sanitizer.log" 2>&1 || status=1
tail -n 6 "$OUT/sanitizer.log"

echo "== self-check"
python3 -m cupy_ops check 2>&1 | tail -n 3 || status=1

echo "== pytest-benchmark suite"
CUPY_OPS_VLLM_ANCHOR="$ANCHOR" python3 -m pytest bench -q -p no:cacheprovider --benchmark-enable \
    --benchmark-json "$OUT/pytest_benchmark.json" > "$OUT/pytest_benchmark.log" 2>&1 || status=1
tail -n 3 "$OUT/pytest_benchmark.log"

echo "== roofline"
python3 -m cupy_ops bench --vllm "$ANCHOR" --json "$OUT/bench.json" --plot "$OUT/bench.png" || status=1
exit $status
