#!/usr/bin/env bash
# Everything the GPU machine runs for a results file, in two stages that each fit one 10-minute device call:
#   tests:  GPU + CPU tests, compute-sanitizer memcheck over the merge GPU tests, the self-check;
#   bench:  the roofline bench against vLLM's anchor kernels, then the pytest-benchmark suite.
# Logs and JSON go to $OUT (default bench/results/latest).
# Usage (repository root, the vLLM anchor copied to .anchors/), with the sha of the commit that was sent (a
# copied tree's .git may be missing or stale, so resolve it before sending):
#   CUPY_OPS_GIT_SHA=<sha> bash bench/run_device.sh [tests|bench|all]
set -uo pipefail
STAGE="${1:-all}"
OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUPY_OPS_CACHE_DIR="${CUPY_OPS_CACHE_DIR:-$(mktemp -d)}"
ANCHOR=".anchors/vllm-0.33.0-C_stable_libtorch-sm90.so.xz"
status=0

if [[ "$STAGE" == tests || "$STAGE" == all ]]; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
    python3 -m cupy_ops info | tee -a "$OUT/gpu.txt"

    echo "== tests (GPU and CPU)"
    python3 -m pytest tests -q -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
    tail -n 4 "$OUT/tests.log"

    # The two >2^31-element tests allocate ~10 GB and take minutes under memcheck; they ran just above. The
    # driver-error test makes the driver refuse a launch on purpose, which the sanitizer reports as an API error.
    echo "== compute-sanitizer memcheck over the merge GPU tests"
    compute-sanitizer --tool memcheck --error-exitcode 99 --target-processes all \
        python3 -m pytest tests/test_merge_gpu.py tests/test_merge_cases.py tests/test_merge_layout_cache.py tests/test_launch_paths.py -q -p no:cacheprovider \
        -k "not past_2_pow_31 and not driver_error" > "$OUT/sanitizer.log" 2>&1 || status=1
    tail -n 4 "$OUT/sanitizer.log"

    echo "== self-check"
    python3 -m cupy_ops check > "$OUT/check.log" 2>&1 || status=1
    tail -n 3 "$OUT/check.log"

    # One JSON for bench/results/: what ran, where, on which commit, and how it ended.
    OUT="$OUT" python3 - <<'PY'
import json, os, torch, cupy
out = os.environ["OUT"]
def lines(name, last=None):
    with open(os.path.join(out, name)) as f:
        text = f.read().strip().splitlines()
    return text[-last:] if last else text
json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cupy": cupy.__version__,
           "git_sha": os.environ.get("CUPY_OPS_GIT_SHA"), "info": lines("gpu.txt"),
           "pytest_tests": lines("tests.log", 1), "compute_sanitizer_memcheck": lines("sanitizer.log", 2),
           "self_check": lines("check.log")}, open(os.path.join(out, "device_checks.json"), "w"), indent=1)
PY
fi

if [[ "$STAGE" == bench || "$STAGE" == all ]]; then
    echo "== roofline"
    plot=(); python3 -c "import matplotlib" 2>/dev/null && plot=(--plot "$OUT/bench.png")
    python3 -m cupy_ops bench --vllm "$ANCHOR" --json "$OUT/bench.json" "${plot[@]}" \
        > "$OUT/bench.log" 2>&1 || status=1
    tail -n 30 "$OUT/bench.log"

    echo "== pytest-benchmark suite"
    CUPY_OPS_VLLM_ANCHOR="$ANCHOR" python3 -m pytest bench -q -p no:cacheprovider --benchmark-enable \
        --benchmark-json "$OUT/pytest_benchmark.json" > "$OUT/pytest_benchmark.log" 2>&1 || status=1
    tail -n 3 "$OUT/pytest_benchmark.log"
fi
exit $status
