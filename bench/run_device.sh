#!/usr/bin/env bash
# What a GPU machine runs for the results files, in stages that each fit one 10-minute device call:
#   tests:     every test (GPU and CPU; vLLM cross-checks with the anchor), compute-sanitizer memcheck over the
#              GPU tests, racecheck over the ops' GPU tests, the self-check;
#   bench:     the roofline bench of every op against vLLM's anchor kernels, then the pytest-benchmark suite.
# Logs and JSON go to $OUT (default bench/results/latest); device_checks.json sums the tests stage up.
# Usage (repository root, the vLLM anchor copied to .anchors/), with the sha of the commit that was sent (a copied
# tree's .git may be missing or stale, so resolve it before sending):
#   CUPY_OPS_GIT_SHA=<sha> bash bench/run_device.sh [tests|bench|all]
# Optional: TESTS="<pytest selection>" narrows the test stage, SANITIZE="<pytest -k expression>" the
# sanitizer runs (default: all GPU tests but the few that allocate > 4 GB), BENCH_OPS="--op X --op Y".
set -uo pipefail
STAGE="${1:-all}"
OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUPY_OPS_CACHE_DIR="${CUPY_OPS_CACHE_DIR:-$(mktemp -d)}"
export CUPY_OPS_VLLM_ANCHOR="${CUPY_OPS_VLLM_ANCHOR:-.anchors/vllm-0.33.0-C_stable_libtorch-sm90.so.xz}"
TESTS="${TESTS:-tests}"
SANITIZE="${SANITIZE:-not past_2_pow_31}"
status=0

if [[ "$STAGE" == tests || "$STAGE" == all ]]; then
    { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; python3 -m cupy_ops info; } \
        > "$OUT/gpu.txt" 2>&1
    python3 -m cupy_ops warmup > /dev/null 2>&1  # compile once, outside the sanitizers' time

    echo "== tests (GPU and CPU)"
    python3 -m pytest $TESTS -q -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
    tail -n 5 "$OUT/tests.log"

    echo "== compute-sanitizer memcheck and racecheck over the GPU tests"
    : > "$OUT/sanitizer.log"
    for tool in memcheck racecheck; do
        selection=$TESTS; [[ $tool == racecheck ]] && selection="${RACECHECK_TESTS:-$TESTS}"
        echo "== $tool" >> "$OUT/sanitizer.log"
        compute-sanitizer --tool $tool --error-exitcode 99 --target-processes all \
            python3 -m pytest $selection -m gpu -q -p no:cacheprovider -x -k "$SANITIZE" \
            >> "$OUT/sanitizer.log" 2>&1 || status=1
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -n 2
    done

    echo "== self-check"
    python3 -m cupy_ops check > "$OUT/check.log" 2>&1 || status=1
    tail -n 1 "$OUT/check.log"

    OUT="$OUT" python3 - <<'PY'
import json, os, re, torch, cupy
out = os.environ["OUT"]
def lines(name):
    with open(os.path.join(out, name)) as f:
        return f.read().strip().splitlines()
summary = lambda text: [l for l in text if re.search(r"(passed|failed|error|ERROR SUMMARY|RACECHECK SUMMARY)", l)]
json.dump({"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "cupy": cupy.__version__, "git_sha": os.environ.get("CUPY_OPS_GIT_SHA"), "info": lines("gpu.txt"),
           "pytest_tests": summary(lines("tests.log"))[-3:], "compute_sanitizer": summary(lines("sanitizer.log")),
           "self_check": lines("check.log")[-1:]}, open(os.path.join(out, "device_checks.json"), "w"), indent=1)
PY
fi

if [[ "$STAGE" == bench || "$STAGE" == all ]]; then
    echo "== roofline"
    python3 -m cupy_ops bench --vllm "$CUPY_OPS_VLLM_ANCHOR" --json "$OUT/bench.json" ${BENCH_OPS:-} \
        > "$OUT/bench.log" 2>&1 || status=1
    tail -n 40 "$OUT/bench.log"

    echo "== pytest-benchmark suite"
    python3 -m pytest bench -q -p no:cacheprovider --benchmark-enable --benchmark-json "$OUT/pytest_benchmark.json" \
        > "$OUT/pytest_benchmark.log" 2>&1 || status=1
    tail -n 3 "$OUT/pytest_benchmark.log"
fi
exit $status
