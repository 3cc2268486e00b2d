#!/usr/bin/env bash
# One device call's checks when the whole `run_device.sh tests` stage does not fit (10 minutes): every GPU-marked
# test, then compute-sanitizer memcheck and racecheck over a fixed sample of the new ops' GPU tests (each kernel
# path: whole and streaming top-k rows, clusters, CUDA graphs, both logit-read modes of the penalties, every
# selective-scan mode; not vLLM's kernels, not the multi-second float64 references, not the second GPU), then the
# self-check. Each step has a time limit; device_checks.json sums up what ran. Usage as run_device.sh:
#   CUPY_OPS_GIT_SHA=<sha> bash bench/device_checks.sh
set -uo pipefail
OUT="${OUT:-bench/results/latest}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUPY_OPS_CACHE_DIR="${CUPY_OPS_CACHE_DIR:-$(mktemp -d)}"
export CUPY_OPS_VLLM_ANCHOR="${CUPY_OPS_VLLM_ANCHOR:-.anchors/vllm-0.33.0-C_stable_libtorch-sm90.so.xz}"
PYTEST=(python3 -m pytest -q -rfE --tb=line -p no:cacheprovider -p timeout --timeout=120)
SAMPLE=(tests/test_topk_per_row_gpu.py tests/test_topk_persistent_gpu.py tests/test_repetition_penalties.py
        tests/test_selective_scan_gpu.py tests/test_selective_scan.py tests/test_launcher_gpu.py)
SAMPLE_K="not vllm and not test_long and not finishes_while and not second_gpu and not opcheck and not compile \
and not rejected and not mask_layouts and not bit_exact and not strided_logits and not batched_lengths \
and not special_values"
status=0
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -m cupy_ops info; } > "$OUT/gpu.txt" 2>&1
echo "== GPU tests"
timeout "${TEST_LIMIT:-240}" "${PYTEST[@]}" tests -m gpu > "$OUT/tests.log" 2>&1 || status=1
tail -n 3 "$OUT/tests.log"
: > "$OUT/sanitizer.log"
for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool over the sample" | tee -a "$OUT/sanitizer.log"
    timeout "${SANITIZER_LIMIT:-150}" compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "${PYTEST[@]}" "${SAMPLE[@]}" -m gpu -k "$SAMPLE_K" >> "$OUT/sanitizer.log" 2>&1 || status=1
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitizer.log" | tail -n 2
done
echo "== self-check"
timeout 120 python3 -m cupy_ops check > "$OUT/check.log" 2>&1 || status=1
tail -n 1 "$OUT/check.log"
OUT="$OUT" SAMPLE_K="$SAMPLE_K" SAMPLE="${SAMPLE[*]}" python3 - <<'PY'
import json, os, re, torch, cupy
out = os.environ["OUT"]
def lines(name):
    with open(os.path.join(out, name)) as f:
        return f.read().strip().splitlines()
keep = lambda text: [l for l in text if re.search(r"(^FAILED|^ERROR|passed|failed|ERROR SUMMARY|RACECHECK SUMMARY|^== )", l)]
json.dump({"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "cupy": cupy.__version__, "git_sha": os.environ.get("CUPY_OPS_GIT_SHA"), "info": lines("gpu.txt"),
           "pytest (tests -m gpu)": keep(lines("tests.log")),
           "compute_sanitizer_sample": {"files": os.environ["SAMPLE"].split(), "k": os.environ["SAMPLE_K"]},
           "compute_sanitizer": keep(lines("sanitizer.log")), "self_check": lines("check.log")[-1:]},
          open(os.path.join(out, "device_checks.json"), "w"), indent=1)
PY
exit $status
