#!/usr/bin/env bash
# What a GPU machine runs for the results files, in stages that each fit one 10-minute device call:
#   tests:  the tests (GPU and CPU; vLLM cross-checks with the anchor), compute-sanitizer memcheck and racecheck
#           over the GPU tests, the self-check; device_checks.json sums them up;
#   bench:  the roofline bench of every op against vLLM's anchor kernels (one process per op, merged into
#           bench.json), then the pytest-benchmark suite's eager host costs;
#   ab:     (not in `all`) bench/tune.py on this checkout's kernels ("base") and on each kernel tree of AB_TREES
#           ("label=DIR ...", DIR another checkout's cuda_kernels/, e.g. carried in .devrun/) and each variant of
#           AB_VARIANTS (one `label: ...` a line; a kernel constant as `label: edit=FILE|OLD|NEW`, see bench/tune.py),
#           AB_ROUNDS rounds interleaved (default 2), for the ops of AB_OPS
#           (default the top-k ops), AB_CASES (space-separated case substrings) if set; ab_<op>.json, ab.log.
#   profile: (not in `all`) ncu (--set full, source lines: CUPY_OPS_NVRTC_OPTIONS=-lineinfo) of PROFILE_OP's cases
#           whose names hold PROFILE_CASES (space-separated substrings), each run once warm by bench/tune.py
#           --profile; profile.ncu-rep, its details page (profile_details.csv) and its SASS source page with
#           per-instruction counters (profile_sass.csv), profile.log.
# Logs and JSON go to $OUT (default bench/results/latest). Usage (repository root, the vLLM anchor copied to
# .anchors/), with the sha of the commit that was sent (a copied tree's .git may be stale):
#   CUPY_OPS_GIT_SHA=<sha> bash bench/run_device.sh [tests|bench|all|ab|profile]
# Narrowing for a short device call: TESTS (pytest arguments, e.g. "tests -m gpu"), K (pytest -k expression for
# the tests), SANITIZERS ("memcheck racecheck", or "" for none), SANITIZE_TESTS (paths, default TESTS) and
# SANITIZE_K (default K) for a sample, TEST_LIMIT and SANITIZER_LIMIT (seconds per pytest run; a run cut there
# still reports what it passed: the tests get SIGINT, so pytest prints its failures too; SIGKILL 30 s later),
# BENCH_ARGS (extra `python -m cupy_ops bench` options, e.g. "--reps 30 --torch-eager --no-compile-timing"),
# OP_TIMEOUT (s per op), PROFILE_LIMIT (s for the profile stage's ncu run, default 300) and PROFILE_KERNELS (its
# ncu -k regex).
set -uo pipefail
STAGE="${1:-all}"
OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUPY_OPS_CACHE_DIR="${CUPY_OPS_CACHE_DIR:-$(mktemp -d)}"
export CUPY_OPS_VLLM_ANCHOR="${CUPY_OPS_VLLM_ANCHOR:-.anchors/vllm-0.33.0-C_stable_libtorch-sm90.so.xz}"
TESTS="${TESTS:-tests}"
K="${K:-not past_2_pow_31}"
SANITIZERS="${SANITIZERS-memcheck racecheck}"
# Per-test time limit where pytest-timeout is installed (the GPU image has it): a hang fails one test, not the run.
TIMEOUT=(); python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT=(-p timeout --timeout=180)
status=0

if [[ "$STAGE" == tests || "$STAGE" == all ]]; then
    { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; python3 -m cupy_ops info; } \
        > "$OUT/gpu.txt" 2>&1

    echo "== tests"
    timeout -s INT -k 30 "${TEST_LIMIT:-0}" \
        python3 -m pytest $TESTS -k "$K" -q -rfE --tb=short -p no:cacheprovider "${TIMEOUT[@]}" \
        > "$OUT/tests.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 30

    : > "$OUT/sanitizer.log"
    for tool in $SANITIZERS; do
        echo "== compute-sanitizer $tool over the GPU tests" | tee -a "$OUT/sanitizer.log"
        # Only our kernels (namespace cupy_ops) are instrumented: under racecheck, torch's own kernels in the
        # references crashed the process (a host segfault in the scan's float64 reference, H200, torch 2.11). Not a
        # narrower filter: with only the two-pass kernels instrumented, racecheck failed inside the sanitizer at
        # the first uninstrumented cluster kernel (H100, 2026-12-05; clean with the whole namespace).
        timeout "${SANITIZER_LIMIT:-0}" compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
            --kernel-name kns=cupy_ops python3 -m pytest ${SANITIZE_TESTS:-$TESTS} -m gpu -k "${SANITIZE_K:-$K}" -q -p no:cacheprovider \
            "${TIMEOUT[@]}" > "$OUT/sanitizer_$tool.log" 2>&1
        code=$?
        # A run cut by SANITIZER_LIMIT prints no summary: say so, with the tests it finished (pytest's dots).
        [[ $code == 124 ]] && printf '\n%s\n' "$tool: cut at ${SANITIZER_LIMIT} s after $(grep -o '^[.FEsx]*' "$OUT/sanitizer_$tool.log" \
            | tr -d '\n' | tr -cd '.' | wc -c) passed tests (a cut run prints no summary)" >> "$OUT/sanitizer_$tool.log"
        [[ $code != 0 ]] && status=1
        cat "$OUT/sanitizer_$tool.log" >> "$OUT/sanitizer.log"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|cut at" "$OUT/sanitizer_$tool.log" | tail -n 1
        rm -f "$OUT/sanitizer_$tool.log"
    done

    echo "== self-check"
    python3 -m cupy_ops check > "$OUT/check.log" 2>&1 || status=1
    tail -n 1 "$OUT/check.log"

    OUT="$OUT" TESTS="$TESTS" K="$K" SANITIZE_TESTS="${SANITIZE_TESTS:-}" SANITIZE_K="${SANITIZE_K:-}" python3 - <<'PY'
import json, os, re, torch, cupy
out = os.environ["OUT"]
def lines(name):
    with open(os.path.join(out, name)) as f:
        return f.read().strip().splitlines()
summary = lambda text: [l for l in text if re.search(r"(^FAILED|^ERROR|passed|failed|ERROR SUMMARY|RACECHECK SUMMARY|"
                                                     r"cut at|^========= .*(Invalid|[Hh]azard))", l)]
json.dump({"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "cupy": cupy.__version__, "git_sha": os.environ.get("CUPY_OPS_GIT_SHA"), "info": lines("gpu.txt"),
           "pytest": summary(lines("tests.log")), "compute_sanitizer": summary(lines("sanitizer.log")),
           "compute_sanitizer_selection": {"tests": os.environ.get("SANITIZE_TESTS") or os.environ.get("TESTS"),
                                           "k": os.environ.get("SANITIZE_K") or os.environ.get("K")},
           "self_check": lines("check.log")[-1:]}, open(os.path.join(out, "device_checks.json"), "w"), indent=1)
PY
fi

if [[ "$STAGE" == bench || "$STAGE" == all ]]; then
    echo "== roofline, one process per op"
    parts="$(mktemp -d)"
    : > "$OUT/bench.log"
    for op in $(python3 -c "from cupy_ops import _bench; print(' '.join(_bench.SUITES))"); do
        timeout "${OP_TIMEOUT:-600}" python3 -m cupy_ops bench --op "$op" --vllm "$CUPY_OPS_VLLM_ANCHOR" \
            --json "$parts/$op.json" ${BENCH_ARGS:-} >> "$OUT/bench.log" 2>&1 || status=1
    done
    PARTS="$parts" OUT="$OUT" python3 - <<'PY'
import glob, json, os
parts = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(os.environ["PARTS"], "*.json")))]
merged = {"meta": parts[0]["meta"] if parts else None, "results": [], "eager_host_us": {}, "compile_ms": {}}
for part in parts:
    merged["results"] += part["results"]
    merged["eager_host_us"].update(part["eager_host_us"])
    merged["compile_ms"].update(part["compile_ms"])
json.dump(merged, open(os.path.join(os.environ["OUT"], "bench.json"), "w"), indent=1)
PY
    grep -vE "^\[|^NVIDIA H200: copy" "$OUT/bench.log" | grep -E "^(op |[a-z_]+ )" | grep -v "^op " | cut -c1-160

    echo "== pytest-benchmark: eager host cost"
    python3 -m pytest bench -k eager -q -p no:cacheprovider --benchmark-enable \
        --benchmark-json "$OUT/pytest_benchmark.json" > "$OUT/pytest_benchmark.log" 2>&1 || status=1
    tail -n 2 "$OUT/pytest_benchmark.log"
fi
if [[ "$STAGE" == ab ]]; then
    echo "== A/B: bench/tune.py over kernel trees and variants"
    args=(--variant base --rounds "${AB_ROUNDS:-2}" --reps "${AB_REPS:-20}")
    for tree in ${AB_TREES:-}; do args+=(--tree "$tree"); done
    while IFS= read -r variant; do [[ -n "$variant" ]] && args+=(--variant "$variant"); done <<< "${AB_VARIANTS:-}"
    for case in ${AB_CASES:-}; do args+=(--case "$case"); done
    : > "$OUT/ab.log"
    for op in ${AB_OPS:-top_k_per_row_prefill top_k_per_row_decode persistent_topk}; do
        timeout "${OP_TIMEOUT:-600}" python3 bench/tune.py --op "$op" "${args[@]}" --json "$OUT/ab_$op.json" \
            >> "$OUT/ab.log" 2>&1 || status=1
    done
    grep -E " us|error|MISMATCH" "$OUT/ab.log" | sort -k3,3 -k1,1 -s | cut -c1-100
fi
if [[ "$STAGE" == profile ]]; then
    echo "== ncu: ${PROFILE_OP:?PROFILE_OP names the op} ${PROFILE_CASES:-every case}"
    cases=(); for case in ${PROFILE_CASES:-}; do cases+=(--case "$case"); done
    CUPY_OPS_NVRTC_OPTIONS=-lineinfo timeout "${PROFILE_LIMIT:-300}" ncu --profile-from-start off --clock-control none \
        --set full --import-source yes -k regex:"${PROFILE_KERNELS:-top_k|persistent|merge|penalt|scan}" -f \
        -o "$OUT/profile" python3 bench/tune.py --op "$PROFILE_OP" ${cases[@]+"${cases[@]}"} --profile \
        > "$OUT/profile.log" 2>&1 || status=1
    ncu -i "$OUT/profile.ncu-rep" --page details --csv > "$OUT/profile_details.csv" 2>> "$OUT/profile.log" || status=1
    ncu -i "$OUT/profile.ncu-rep" --page source --csv --print-source sass > "$OUT/profile_sass.csv" \
        2>> "$OUT/profile.log" || status=1
    grep -E '"(Duration|Memory Throughput|DRAM Throughput|Registers Per Thread|Achieved Occupancy)"' \
        "$OUT/profile_details.csv" | cut -c1-200
fi
exit $status
