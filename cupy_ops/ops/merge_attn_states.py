"""merge_attn_states: combine two partial attention results using their log-sum-exp values.

    output[t, h, :] = prefix_output[t, h, :] * a + suffix_output[t, h, :] * b,   a + b = 1,
    a = exp(P - M) / s, b = exp(S - M) / s, s = exp(P - M) + exp(S - M), M = max(P, S),
    output_lse[h, t] = log(s) + M,

with P = prefix_lse[h, t], S = suffix_lse[h, t] (natural log; +-inf means "no keys on that side"). Tokens
t >= prefill_tokens_with_context copy the suffix. Spec and vLLM's history: ../shared/specs/merge_attn_states.md.

Same schema, argument order and semantics as vLLM 0.33 (`torch.ops._C.merge_attn_states`), except:
- `prefill_tokens_with_context` is `int?`, not vLLM's `int!?`: an alias annotation on an int makes
  functionalization (torch.compile, opcheck) reject the op; callers see no difference.
- every tensor is addressed with its own strides (vLLM assumes token stride = h * head stride and reads the
  suffix with the prefix's strides), with 64-bit offsets, any head size and any pointer alignment (vLLM needs
  16-byte alignment and dies with "misaligned address" on an odd-offset output slice);
- a NaN lse always propagates (vLLM's fmaxf turns (NaN, -inf) into "both sides empty": prefix output, lse -inf);
- n = 0 launches nothing; bad shapes, dtypes, devices, an out-of-range prefill count and an output_lse that
  aliases an input lse raise ValueError/TypeError before any launch.
"""

from __future__ import annotations

import torch

from .._runtime import Call, Kernel, Launch, LaunchConfig, Op, TensorArg, dtype_name, fast_divmod
from .._runtime import params as P

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
F32 = (torch.float32,)
SOURCE = "merge_attn_states.cu"
_CUDA_TYPE = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
# Threads per block; vLLM uses 128 too. Rows of head_size / VEC threads are stacked to fill a block.
THREADS_PER_BLOCK = 128
_MAX_THREADS_PER_ROW = 256
_INT32_LIMIT = 1 << 31

PARAMS = P.CStruct("MergeAttnStatesParams", [
    P.ptr("output"), P.ptr("output_lse"), P.ptr("prefix_output"), P.ptr("prefix_lse"), P.ptr("suffix_output"),
    P.ptr("suffix_lse"), P.ptr("output_scale"),
    P.i64("prefill_tokens"), P.i64("num_rows"), P.i64("num_heads"), P.i64("head_size"),
    P.fast_divmod("row_to_token"),
    P.i64("output_stride", 2), P.i64("prefix_stride", 2), P.i64("suffix_stride", 2),
    P.i64("output_lse_stride", 2), P.i64("prefix_lse_stride", 2), P.i64("suffix_lse_stride", 2),
])


def _vector_widths(dtype: torch.dtype) -> tuple[int, ...]:
    """Elements per thread per step that a dtype can use: 16 bytes down to one element."""
    return tuple(w for w in (8, 4, 2, 1) if w * dtype.itemsize <= 16)


# (input dtype, fp8 output, elements per vector, 64-bit offsets) -> Kernel
KERNELS = {
    (dtype, fp8, vec, wide): Kernel(
        SOURCE,
        f"cupy_ops::merge_attn_states_kernel<{_CUDA_TYPE[dtype]}, "
        f"{'cupy_ops::fp8_e4m3' if fp8 else _CUDA_TYPE[dtype]}, {vec}, {'true' if wide else 'false'}>")
    for dtype in INPUT_DTYPES for fp8 in (False, True) for vec in _vector_widths(dtype) for wide in (False, True)
}


def check(c: Call) -> None:
    """Rules across arguments: output dtype, the fp8 scale, the prefill count."""
    fp8 = c.output_scale is not None
    if fp8:
        if c.output.dtype != FP8_DTYPE:
            c.reject("output", f"must be float8_e4m3fn when output_scale is given, got {dtype_name(c.output.dtype)}",
                     TypeError)
        if c.output_scale.numel != 1 or len(c.output_scale.shape) > 1:
            c.reject("output_scale", f"must hold one element, got shape {c.output_scale.shape}")
    elif c.output.dtype != c.prefix_output.dtype:
        c.reject("output", f"dtype {dtype_name(c.output.dtype)} must equal prefix_output's "
                 f"{dtype_name(c.prefix_output.dtype)} (or be float8_e4m3fn with output_scale)", TypeError)
    p = c.prefill_tokens_with_context
    if p is not None and not 0 <= p <= c.dims["n"]:
        c.reject("prefill_tokens_with_context", f"= {p} is outside [0, num_tokens = {c.dims['n']}]")


def plan(c: Call) -> list:
    n, h, d = c.dims["n"], c.dims["h"], c.dims["d"]
    if n == 0 or h == 0 or (d == 0 and c.output_lse is None):
        return []  # nothing to write (d = 0 still writes the merged lse)
    out, po, so = c.output, c.prefix_output, c.suffix_output
    lse_strides = (0, 0) if c.output_lse is None else c.output_lse.strides
    dtype, fp8 = po.dtype, c.output_scale is not None
    # The widest vector (16 bytes down to 1 element) at which every row of the three [n, h, d] tensors starts
    # aligned: strides in elements, pointers in bytes (the fp8 output has 1-byte elements).
    misalign = (out.strides[0] | out.strides[1] | po.strides[0] | po.strides[1] | so.strides[0] | so.strides[1]
                | (po.align | so.align) // dtype.itemsize | (out.align if fp8 else out.align // dtype.itemsize))
    vec = 16 // dtype.itemsize if misalign == 0 else min(16 // dtype.itemsize, misalign & -misalign)
    while vec > max(d, 1):
        vec //= 2
    threads_per_row = max(1, min(-(-d // vec), _MAX_THREADS_PER_ROW))
    rows_per_block = max(1, THREADS_PER_BLOCK // threads_per_row)
    rows = n * h
    strides = [out.strides[:2], po.strides[:2], so.strides[:2], lse_strides, c.prefix_lse.strides,
               c.suffix_lse.strides]
    # 32-bit offsets unless a row index or an element offset can reach 2^31 (vllm#45500 overflowed there);
    # [n, h, d] strides are (token, head), lse strides (head, token).
    reach = sum((n - 1) * abs(s[0]) + (h - 1) * abs(s[1]) for s in strides[:3])
    reach += sum((h - 1) * abs(s[0]) + (n - 1) * abs(s[1]) for s in strides[3:]) + d
    wide = rows >= _INT32_LIMIT or reach >= _INT32_LIMIT
    p = n if c.prefill_tokens_with_context is None else c.prefill_tokens_with_context
    return [Launch(KERNELS[dtype, fp8, vec, wide],
                   LaunchConfig((-(-rows // rows_per_block), 1, 1), (threads_per_row, rows_per_block, 1)), PARAMS,
                   dict(prefill_tokens=p, num_rows=rows, num_heads=h, head_size=d, row_to_token=fast_divmod(h),
                        output_stride=strides[0], prefix_stride=strides[1], suffix_stride=strides[2],
                        output_lse_stride=strides[3], prefix_lse_stride=strides[4], suffix_lse_stride=strides[5]))]


def merge_attn_states_ref(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                          prefill_tokens_with_context=None, output_scale=None, *,
                          compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The op's arguments, functional: returns (new output [n, h, d], new output_lse [h, n] float32 or None when
    output_lse is None); nothing is written. Math in `compute_dtype` (float32 like the kernel; float64 for a
    gold standard), rounded to output's dtype: the input dtype, or float8_e4m3fn after scaling by
    1 / output_scale, clamping to +-448 and NaN -> +448."""
    n = prefix_output.shape[0]
    p = n if prefill_tokens_with_context is None else prefill_tokens_with_context
    po, so = prefix_output.to(compute_dtype), suffix_output.to(compute_dtype)
    raw_suffix_lse = suffix_lse.to(compute_dtype)
    neg_inf = torch.full((), float("-inf"), dtype=compute_dtype, device=po.device)  # no host copy: graph-safe
    pl = torch.where(prefix_lse.isinf(), neg_inf, prefix_lse.to(compute_dtype))
    sl = torch.where(suffix_lse.isinf(), neg_inf, raw_suffix_lse)
    m = torch.maximum(pl, sl)
    no_keys = m == float("-inf")
    m_safe = torch.where(no_keys, torch.zeros_like(m), m)
    a, b = torch.exp(pl - m_safe), torch.exp(sl - m_safe)
    s = a + b
    merged = po * (a / s).transpose(0, 1).unsqueeze(-1) + so * (b / s).transpose(0, 1).unsqueeze(-1)
    merged = torch.where(no_keys.transpose(0, 1).unsqueeze(-1), po, merged)
    lse = torch.where(no_keys, neg_inf, torch.log(s) + m)
    merged[p:] = so[p:]  # tokens without context take the suffix as it is
    lse[:, p:] = raw_suffix_lse[:, p:]
    if output_scale is None:
        out = merged.to(prefix_output.dtype)
    else:
        scaled = merged.to(torch.float32) * (1.0 / output_scale.to(torch.float32).reshape(()))
        scaled = torch.where(scaled.isnan(), torch.full_like(scaled, FP8_MAX), scaled)
        out = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return out, None if output_lse is None else lse.to(torch.float32)


def examples(device: str) -> list[tuple[str, tuple]]:
    """Random calls for `python -m cupy_ops check`: each input dtype, to itself and to fp8, contiguous and as an
    unaligned output view with d = 80 and p = n / 2; ~10% infinite lse on each side."""
    cases = []
    for dtype in INPUT_DTYPES:
        for fp8 in (False, True):
            for n, h, d, sliced in ((513, 8, 128, False), (77, 5, 80, True)):
                prefix, suffix = (torch.randn(n, h, d, device=device).to(dtype) for _ in range(2))
                prefix_lse, suffix_lse = torch.randn(h, n, device=device) * 4, torch.randn(h, n, device=device) * 4
                prefix_lse[torch.rand(h, n, device=device) < 0.1] = float("inf")
                suffix_lse[torch.rand(h, n, device=device) < 0.1] = float("-inf")
                # One element into a buffer: an unaligned view.
                output = torch.empty(n * h * d + 1, dtype=FP8_DTYPE if fp8 else dtype, device=device)[1:].view(n, h, d)
                scale = torch.tensor([0.05], device=device) if fp8 else None
                label = (f"{str(dtype)[6:]}{' -> fp8' if fp8 else ''} {n}x{h}x{d}"
                         f"{' unaligned output, p = n/2' if sliced else ''}")
                cases.append((label, (output, torch.empty(h, n, device=device), prefix, prefix_lse, suffix,
                                      suffix_lse, n // 2 if sliced else None, scale)))
    return cases


OP = Op(
    "merge_attn_states(Tensor! output, Tensor!? output_lse, Tensor prefix_output, Tensor prefix_lse, "
    "Tensor suffix_output, Tensor suffix_lse, int? prefill_tokens_with_context, Tensor? output_scale=None) -> ()",
    tensors=[  # validation order: the first argument with a dimension fixes it
        TensorArg("prefix_output", "in", ("n", "h", "d"), INPUT_DTYPES, unit_last_stride=True, aligned=True),
        TensorArg("suffix_output", "in", ("n", "h", "d"), "prefix_output", unit_last_stride=True, aligned=True),
        TensorArg("prefix_lse", "in", ("h", "n"), F32),
        TensorArg("suffix_lse", "in", ("h", "n"), F32),
        TensorArg("output", "out", ("n", "h", "d"), (*INPUT_DTYPES, FP8_DTYPE), unit_last_stride=True, aligned=True,
                  # each thread reads its own elements before writing them: in place is safe
                  may_alias=("prefix_output", "suffix_output")),
        TensorArg("output_lse", "out", ("h", "n"), F32),
        TensorArg("output_scale", "in", None, F32),
    ],
    kernels=KERNELS.values(), params=PARAMS, check=check, plan=plan, reference=merge_attn_states_ref,
    examples=examples, doc=__doc__,
)
merge_attn_states = OP.public
