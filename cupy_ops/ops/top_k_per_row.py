"""top_k_per_row_prefill, top_k_per_row_decode: per row, the indices of the topK largest fp32 scores of the row's
window, relative to the window's start. Spec: ../shared/specs/sampler_ops.md section 2.

    indices[r, :] = the topK columns of logits[r, start_r : start_r + L_r] with the largest values, minus start_r,
                    in ascending order; when L_r <= topK: 0, 1, ..., L_r - 1, then -1.

prefill: window [rowStarts[r], rowEnds[r]). decode: window [0, end_r) with end_r = seq_lens[r] when seq_lens is 2-D
with numRows elements, else seq_lens.flat[r // next_n] - next_n + r % next_n + 1 (query r % next_n of its sequence).

Same schemas and output contract as vLLM 0.33 (`torch.ops._C.top_k_per_row_*`), and beyond it:
- deterministic: values are ranked by an order-preserving key in which -0 == +0 and every NaN ranks above +inf
  (torch.topk's order), ties at the topK-th value go to the lowest column, and the output lists the chosen columns in
  ascending order: the same bits on every run and GPU, equal to the `*_ref` references (vLLM's order and tie choice
  vary from call to call; its radix path can emit garbage indices when -inf must fill the last slots);
- windows are clamped to the row: start = clamp(rowStart, 0, W), end = clamp(rowEnd, start, W) (prefill), end =
  clamp(end_r, 0, W) (decode), so rowEnd < rowStart or seq_len < next_n give empty rows (all -1) and nothing is read
  outside the row; indices stay relative to the clamped start;
- any topK in 1..4096 (GPUs with 99 KB of shared memory a block, sm_86 / sm_89: up to 2528 for rows wider than
  ~8K scores, else a ValueError naming topK: NoRowPlan), any rowStart alignment, any stride1 (16-byte loads where
  the row is contiguous);
- numRows, stride0 and stride1 are checked against logits (numRows == logits.size(0) == indices.size(0); the
  strides equal logits' where that dimension has more than one element), and indices may have any row stride.
The row machinery (constants, plans, kernels, the reference select) is topk_rows.py's, shared with
persistent_topk.
"""

from __future__ import annotations

import torch

from .._runtime import Call, Launch, Op, TensorArg, launcher
from .._runtime import params as P
from .topk_rows import MAX_ROWS, NoRowPlan, check_k_and_width, check_lengths, plan_rows, row_kernels, select_rows_ref

_F32, _I32 = (torch.float32,), (torch.int32,)
# Prefill calls with more CTAs than SMs run their rows last-first (the kernel's row_of): causal prefill rows grow with
# the row index, so the longest start first and the call ends on the shortest. Decode rows keep launch order
# (lengths in no order), and so do grids that fit the SMs at once (nothing waits for a slot). H200, A/B in one run
# (2026-12-05): 2048 x 16384 k 512 63.4 -> 59.6 us, 8192 x 32768 372.9 -> 366.6, 4096 x 8192 64.2 -> 64.2; the
# 128-CTA grid of 64 x 65536 k 2048 16.0 -> 16.35.
REVERSE_PREFILL_ROWS = True


# ---- reference (also the CPU kernel) ---------------------------------------------------------------------------------

def _prefill_windows(logits, row_starts, row_ends, num_rows):
    width = logits.shape[1]
    start = row_starts.reshape(-1)[:num_rows].to(torch.int64).clamp(0, width)
    end = torch.maximum(row_ends.reshape(-1)[:num_rows].to(torch.int64), start).clamp(max=width)
    return start, end - start


def decode_ends(seq_lens: torch.Tensor, next_n: int, num_rows: int) -> torch.Tensor:
    """int64 [num_rows]: each decode row's end before clamping (the per-row lengths of a 2-D seq_lens with num_rows
    elements, else the causal formula on the flattened seq_lens)."""
    flat = seq_lens.reshape(-1).to(torch.int64)
    if seq_lens.dim() == 2 and flat.numel() == num_rows:
        return flat
    r = torch.arange(num_rows, device=seq_lens.device)
    return flat[r // next_n] - next_n + r % next_n + 1


def top_k_per_row_prefill_ref(logits, rowStarts, rowEnds, indices, numRows, stride0, stride1, topK, *,
                              compute_dtype=torch.float32):
    """(new indices [numRows, topK] int32,): the op's result (exact; compute_dtype is unused)."""
    start, length = _prefill_windows(logits, rowStarts, rowEnds, numRows)
    return (select_rows_ref(logits[:numRows], start, length, topK),)


def top_k_per_row_decode_ref(logits, next_n, seq_lens, indices, numRows, stride0, stride1, topK, *,
                             compute_dtype=torch.float32):
    """(new indices [numRows, topK] int32,): the op's result (exact; compute_dtype is unused)."""
    length = decode_ends(seq_lens, next_n, numRows).clamp(0, logits.shape[1])
    return (select_rows_ref(logits[:numRows], torch.zeros_like(length), length, topK),)


# ---- the op ----------------------------------------------------------------------------------------------------------

KERNELS = row_kernels("top_k_per_row.cu", "top_k_per_row_kernel")  # what prefill and decode may launch
PARAMS = P.CStruct("TopKPerRowParams", [
    P.ptr("indices"), P.ptr("logits"), P.ptr("starts", "rowStarts"), P.ptr("ends", "rowEnds"),
    P.i64("num_cols"), P.i64("stride0"), P.i64("stride1"), P.i64("out_stride"),
    P.i32("k"), P.i32("cap"), P.i32("stage"), P.i32("stages"), P.i32("sample"), P.f32("sample_spread"),
    P.i32("sample_floor"), P.i32("decode"), P.i32("next_n"), P.i32("per_row"), P.i32("reverse"),
])
# decode has no rowStarts/rowEnds: both pointers take seq_lens (the kernel reads `ends` only).
DECODE_PARAMS = P.CStruct("TopKPerRowParams", [
    P.ptr("indices"), P.ptr("logits"), P.ptr("starts", "seq_lens"), P.ptr("ends", "seq_lens"), *PARAMS.fields[4:]])


def _check_common(c: Call) -> None:
    rows, cols = c.dims["rows"], c.dims["cols"]
    if c.numRows != rows:
        c.reject("numRows", f"= {c.numRows} must equal logits.size(0) = {rows} (and indices.size(0))")
    for axis, name in ((0, "stride0"), (1, "stride1")):
        given, actual = getattr(c, name), c.logits.strides[axis]
        if c.logits.shape[axis] > 1 and given != actual:
            c.reject(name, f"= {given} must equal logits.stride({axis}) = {actual}")
    check_k_and_width(c, "topK", "indices", cols)


def check_prefill(c: Call) -> None:
    _check_common(c)
    check_lengths(c, "rowStarts", c.numRows)
    check_lengths(c, "rowEnds", c.numRows)


def check_decode(c: Call) -> None:
    _check_common(c)
    if not 1 <= c.next_n <= MAX_ROWS:
        c.reject("next_n", f"= {c.next_n} must be in [1, 2^31 - 1]")
    per_row = len(c.seq_lens.shape) == 2 and c.seq_lens.numel == c.numRows
    check_lengths(c, "seq_lens", c.numRows if per_row else -(-c.numRows // c.next_n), dims=(1, 2))


def _plan(c: Call, decode: bool) -> list:
    rows, cols = c.dims["rows"], c.dims["cols"]
    if rows == 0:
        return []
    contiguous = c.logits.strides[1] == 1 or cols <= 1
    try:
        kernel, config, row = plan_rows(KERNELS, c.device, rows, cols, c.topK, contiguous)
    except NoRowPlan as exc:
        c.reject("topK", str(exc))
    per_row = decode and len(c.seq_lens.shape) == 2 and c.seq_lens.numel == rows
    waits = config.grid[0] > launcher.device_attribute(c.device, "sm_count")  # some CTAs wait for a slot
    values = {"num_cols": cols, "stride0": c.logits.strides[0], "stride1": c.logits.strides[1],
              "out_stride": c.indices.strides[0], "k": c.topK, "cap": row.cap, "stage": row.stage,
              "stages": row.stages, "sample": row.sample, "sample_spread": row.sample_spread,
              "sample_floor": row.sample_floor, "decode": int(decode), "next_n": c.next_n if decode else 1,
              "per_row": int(per_row), "reverse": int(REVERSE_PREFILL_ROWS and not decode and waits)}
    return [Launch(kernel, config, DECODE_PARAMS if decode else PARAMS, values)]


def plan_prefill(c: Call) -> list:
    return _plan(c, decode=False)


def plan_decode(c: Call) -> list:
    return _plan(c, decode=True)


def _examples_logits(device, rows, cols, gen):
    return torch.randn(rows, cols, generator=gen, device=device)


def examples_prefill(device: str) -> list[tuple[str, tuple]]:
    """Causal prefill windows over 300 rows of 5000 columns, K 2048, starts at 0 and at 7 (unaligned)."""
    gen = torch.Generator(device=device).manual_seed(0)
    cases = []
    for start in (0, 7):
        rows, cols = 300, 5000
        logits = _examples_logits(device, rows, cols, gen)
        starts = torch.full((rows,), start, dtype=torch.int32, device=device)
        ends = torch.linspace(start, cols, rows, device=device).to(torch.int32)
        indices = torch.empty(rows, 2048, dtype=torch.int32, device=device)
        cases.append((f"prefill {rows}x{cols} K2048 start {start}",
                      (logits, starts, ends, indices, rows, cols, 1, 2048)))
    return cases


def examples_decode(device: str) -> list[tuple[str, tuple]]:
    """4 sequences x next_n 2 over 70000 columns (long rows), K 2048 and 512."""
    gen = torch.Generator(device=device).manual_seed(1)
    cases = []
    for k in (2048, 512):
        logits = _examples_logits(device, 8, 70000, gen)
        seq_lens = torch.tensor([70000, 3000, 2049, 40000], dtype=torch.int32, device=device)
        indices = torch.empty(8, k, dtype=torch.int32, device=device)
        cases.append((f"decode 4x2x70000 K{k}", (logits, 2, seq_lens, indices, 8, 70000, 1, k)))
    return cases


_LOGITS = TensorArg("logits", "in", ("rows", "cols"), _F32)
_INDICES = TensorArg("indices", "out", ("rows", "k"), _I32, unit_last_stride=True)

PREFILL = Op(
    "top_k_per_row_prefill(Tensor logits, Tensor rowStarts, Tensor rowEnds, Tensor! indices, int numRows, "
    "int stride0, int stride1, int topK) -> ()",
    tensors=[_LOGITS, TensorArg("rowStarts", "in", None, _I32), TensorArg("rowEnds", "in", None, _I32), _INDICES],
    kernels=KERNELS.all(), params=PARAMS, check=check_prefill, plan=plan_prefill,
    reference=top_k_per_row_prefill_ref, examples=examples_prefill, doc=__doc__)
DECODE = Op(
    "top_k_per_row_decode(Tensor logits, int next_n, Tensor seq_lens, Tensor! indices, int numRows, int stride0, "
    "int stride1, int topK) -> ()",
    tensors=[_LOGITS, TensorArg("seq_lens", "in", None, _I32), _INDICES],
    kernels=KERNELS.all(), params=DECODE_PARAMS, check=check_decode, plan=plan_decode,
    reference=top_k_per_row_decode_ref, examples=examples_decode, doc=__doc__)
top_k_per_row_prefill = PREFILL.public
top_k_per_row_decode = DECODE.public
