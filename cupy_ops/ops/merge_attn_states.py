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
- n = 0 launches nothing; bad shapes, dtypes, devices, an out-of-range prefill count and an output_lse that
  aliases an input lse raise ValueError/TypeError before any launch.
"""

from __future__ import annotations

import struct

import torch

from .. import _runtime
from .._library import register_op
from .._runtime import arrays

OP = "merge_attn_states"
SCHEMA = (
    "merge_attn_states(Tensor! output, Tensor!? output_lse, Tensor prefix_output, Tensor prefix_lse, "
    "Tensor suffix_output, Tensor suffix_lse, int? prefill_tokens_with_context, Tensor? output_scale=None) -> ()"
)
SOURCE = "merge_attn_states.cu"
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0

_CUDA_TYPE = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
# Threads per block; vLLM uses 128 too. Rows of head_size / VEC threads are stacked to fill a block.
THREADS_PER_BLOCK = 128
_MAX_THREADS_PER_ROW = 256
# MergeAttnStatesParams: 7 pointers, 4 sizes, fast_divmod (3 words), 6 stride pairs. All 8-byte fields.
_PARAMS = struct.Struct("<7Q4q3Q12q")


def _vector_widths(dtype: torch.dtype) -> tuple[int, ...]:
    """Elements per thread per step that a dtype can use: 16 bytes down to one element."""
    widest = 16 // torch.empty((), dtype=dtype).element_size()
    return tuple(w for w in (8, 4, 2, 1) if w <= widest)


def instantiations() -> list[tuple[str, str]]:
    """Every (source file, name expression) this op can launch; `warmup` and the compile tests use it."""
    names = []
    for dtype in INPUT_DTYPES:
        scalar = _CUDA_TYPE[dtype]
        for out in (scalar, "cupy_ops::fp8_e4m3"):
            for vec in _vector_widths(dtype):
                names.append((SOURCE, f"cupy_ops::merge_attn_states_kernel<{scalar}, {out}, {vec}>"))
    return names


_KERNELS = {}  # (input dtype, fp8 output, vec) -> Kernel
for _dtype in INPUT_DTYPES:
    for _fp8 in (False, True):
        for _vec in _vector_widths(_dtype):
            _out = "cupy_ops::fp8_e4m3" if _fp8 else _CUDA_TYPE[_dtype]
            _KERNELS[_dtype, _fp8, _vec] = _runtime.Kernel(
                SOURCE, f"cupy_ops::merge_attn_states_kernel<{_CUDA_TYPE[_dtype]}, {_out}, {_vec}>")


# ---- validation (shared by the CUDA, CPU and CuPy paths) --------------------------------------------------


def _check(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
           prefill_tokens_with_context, output_scale):
    """Validate every argument; return (infos, n, h, d, p, fp8) for the launch. Raises before any launch."""
    kind = torch.Tensor if isinstance(prefix_output, torch.Tensor) else None
    describe = arrays.describe
    po = describe(prefix_output, OP, "prefix_output", kind)
    kind = type(prefix_output) if kind is None else kind
    pl = describe(prefix_lse, OP, "prefix_lse", kind)
    so = describe(suffix_output, OP, "suffix_output", kind)
    sl = describe(suffix_lse, OP, "suffix_lse", kind)
    out = describe(output, OP, "output", kind)
    out_lse = None if output_lse is None else describe(output_lse, OP, "output_lse", kind)
    scale = None if output_scale is None else describe(output_scale, OP, "output_scale", kind)

    if len(po.shape) != 3:
        raise ValueError(f"{OP}: prefix_output must be [num_tokens, num_heads, head_size], got shape "
                         f"{tuple(po.shape)}")
    n, h, d = po.shape
    for name, info in (("suffix_output", so), ("output", out)):
        if info.shape != po.shape:
            raise ValueError(f"{OP}: {name} has shape {tuple(info.shape)}, expected {tuple(po.shape)} "
                             "like prefix_output")
    for name, info in (("prefix_lse", pl), ("suffix_lse", sl), ("output_lse", out_lse)):
        if info is None:
            continue
        if tuple(info.shape) != (h, n):
            raise ValueError(f"{OP}: {name} has shape {tuple(info.shape)}, expected [num_heads, num_tokens] "
                             f"= {(h, n)}")
        if info.dtype != torch.float32:
            raise TypeError(f"{OP}: {name} must be float32, got {info.dtype}")

    if po.dtype not in INPUT_DTYPES:
        raise TypeError(f"{OP}: prefix_output must be float32, float16 or bfloat16, got {po.dtype}")
    if so.dtype != po.dtype:
        raise TypeError(f"{OP}: suffix_output dtype {so.dtype} differs from prefix_output dtype {po.dtype}")
    fp8 = scale is not None
    if fp8:
        if out.dtype != FP8_DTYPE:
            raise TypeError(f"{OP}: with output_scale, output must be float8_e4m3fn, got {out.dtype}")
        if scale.dtype != torch.float32 or len(scale.shape) > 1 or _numel(scale.shape) != 1:
            raise ValueError(f"{OP}: output_scale must be a 1-element float32 tensor, got {scale.dtype} "
                             f"of shape {tuple(scale.shape)}")
    elif out.dtype != po.dtype:
        raise TypeError(f"{OP}: output dtype {out.dtype} must equal prefix_output dtype {po.dtype} "
                        "(or be float8_e4m3fn with output_scale)")

    if prefill_tokens_with_context is None:
        p = n
    elif isinstance(prefill_tokens_with_context, bool) or not isinstance(prefill_tokens_with_context, int):
        raise TypeError(f"{OP}: prefill_tokens_with_context must be an int or None, got "
                        f"{type(prefill_tokens_with_context).__name__}")
    else:
        p = prefill_tokens_with_context
        if not 0 <= p <= n:
            raise ValueError(f"{OP}: prefill_tokens_with_context={p} is outside [0, num_tokens={n}]")

    device = po.device
    for name, info in (("prefix_lse", pl), ("suffix_output", so), ("suffix_lse", sl), ("output", out),
                       ("output_lse", out_lse), ("output_scale", scale)):
        if info is not None and info.device != device:
            raise ValueError(f"{OP}: {name} is on {_device_name(info.device)} but prefix_output is on "
                             f"{_device_name(device)}; all tensors must be on one device")

    if d > 1:
        for name, info in (("output", out), ("prefix_output", po), ("suffix_output", so)):
            if info.strides[2] != 1:
                raise ValueError(f"{OP}: {name} must have a contiguous last dimension (stride 1), got strides "
                                 f"{tuple(info.strides)}")
    _check_aliasing(out, out_lse, po, pl, so, sl)
    return (out, out_lse, po, pl, so, sl, scale), n, h, d, p, fp8


def _check_aliasing(out, out_lse, po, pl, so, sl):
    if arrays.has_internal_overlap(out) or (out_lse is not None and arrays.has_internal_overlap(out_lse)):
        raise ValueError(f"{OP}: output and output_lse must not have elements that share memory")
    # Threads of one (token, head) row can sit in different warps: an lse written in place could be read
    # after it was overwritten. An output that is exactly an input (same address and strides) is safe: each
    # thread reads its own elements before writing them.
    if out_lse is not None:
        for name, info in (("prefix_lse", pl), ("suffix_lse", sl), ("prefix_output", po),
                           ("suffix_output", so), ("output", out)):
            if arrays.spans_overlap(out_lse, info):
                raise ValueError(f"{OP}: output_lse overlaps {name} in memory")
    for name, info in (("prefix_output", po), ("suffix_output", so), ("prefix_lse", pl), ("suffix_lse", sl)):
        same_view = info.ptr == out.ptr and info.strides == out.strides and info.dtype == out.dtype
        if not same_view and arrays.spans_overlap(out, info):
            raise ValueError(f"{OP}: output partially overlaps {name} in memory")


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _device_name(index: int) -> str:
    return "cpu" if index < 0 else f"cuda:{index}"


# ---- CUDA launch --------------------------------------------------------------------------------------------


def _launch(infos, n, h, d, p, fp8, stream_of) -> None:
    if n == 0 or h == 0 or d == 0:
        return  # nothing to write; CuPy/driver would still run one block for a zero grid
    out, out_lse, po, pl, so, sl, scale = infos
    dtype = po.dtype
    widest = 16 // po.itemsize
    # Largest vector that every row start is aligned to (strides in elements, pointers in bytes).
    misalign = (out.strides[0] | out.strides[1] | po.strides[0] | po.strides[1] | so.strides[0]
                | so.strides[1] | ((po.ptr | so.ptr) // po.itemsize) | (out.ptr // out.itemsize))
    vec = widest if misalign == 0 else min(widest, misalign & -misalign)
    while vec > d:
        vec //= 2
    threads_per_row = min(-(-d // vec), _MAX_THREADS_PER_ROW)
    rows_per_block = max(1, THREADS_PER_BLOCK // threads_per_row)
    rows = n * h
    grid = -(-rows // rows_per_block)
    device = po.device
    kernel = _KERNELS[dtype, fp8, vec]
    no_lse = out_lse is None
    params = (
        out.ptr, 0 if no_lse else out_lse.ptr, po.ptr, pl.ptr, so.ptr, sl.ptr, 0 if scale is None else scale.ptr,
        rows, h, d, p, *_runtime.fast_divmod(h),
        out.strides[0], out.strides[1], po.strides[0], po.strides[1], so.strides[0], so.strides[1],
        0 if no_lse else out_lse.strides[0], 0 if no_lse else out_lse.strides[1],
        pl.strides[0], pl.strides[1], sl.strides[0], sl.strides[1],
    )
    _runtime.launch(kernel.function(device), grid, (threads_per_row, rows_per_block), _PARAMS, params,
                    stream_of(device))


def _merge_cuda(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                prefill_tokens_with_context=None, output_scale=None) -> None:
    """CUDA kernel of the registered op, and the eager path for CUDA tensors."""
    infos, n, h, d, p, fp8 = _check(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                                    prefill_tokens_with_context, output_scale)
    device = infos[2].device
    if device == torch._C._cuda_getDevice():
        _launch(infos, n, h, d, p, fp8, arrays.torch_stream)
    else:
        with torch.cuda.device(device):
            _launch(infos, n, h, d, p, fp8, arrays.torch_stream)


def _merge_cupy(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                prefill_tokens_with_context=None, output_scale=None) -> None:
    import cupy

    infos, n, h, d, p, fp8 = _check(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                                    prefill_tokens_with_context, output_scale)
    with cupy.cuda.Device(infos[2].device):
        _launch(infos, n, h, d, p, fp8, arrays.cupy_stream)


# ---- reference (pure torch; the op's CPU kernel) ---------------------------------------------------------


def merge_attn_states_ref(prefix_output: torch.Tensor, prefix_lse: torch.Tensor, suffix_output: torch.Tensor,
                          suffix_lse: torch.Tensor, prefill_tokens_with_context: int | None = None,
                          output_scale: torch.Tensor | None = None, *,
                          compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Functional reference: returns (output [n, h, d], output_lse [h, n] float32).

    Math in `compute_dtype` (float32 like the kernel; float64 for a gold standard), rounded to the input
    dtype, or to float8_e4m3fn after scaling by 1 / output_scale, clamping to +-448 and NaN -> +448.
    """
    n = prefix_output.shape[0]
    p = n if prefill_tokens_with_context is None else prefill_tokens_with_context
    po = prefix_output.to(compute_dtype)
    so = suffix_output.to(compute_dtype)
    raw_suffix_lse = suffix_lse.to(compute_dtype)
    neg_inf = torch.tensor(float("-inf"), dtype=compute_dtype, device=po.device)
    P = torch.where(prefix_lse.isinf(), neg_inf, prefix_lse.to(compute_dtype))
    S = torch.where(suffix_lse.isinf(), neg_inf, raw_suffix_lse)
    M = torch.maximum(P, S)
    no_keys = M == float("-inf")
    M_safe = torch.where(no_keys, torch.zeros_like(M), M)
    a = torch.exp(P - M_safe)
    b = torch.exp(S - M_safe)
    s = a + b
    a_t = (a / s).transpose(0, 1).unsqueeze(-1)
    b_t = (b / s).transpose(0, 1).unsqueeze(-1)
    merged = po * a_t + so * b_t
    merged = torch.where(no_keys.transpose(0, 1).unsqueeze(-1), po, merged)
    lse = torch.where(no_keys, neg_inf, torch.log(s) + M)
    # Tokens without context take the suffix as it is.
    merged[p:] = so[p:]
    lse[:, p:] = raw_suffix_lse[:, p:]

    if output_scale is None:
        out = merged.to(prefix_output.dtype)
    else:
        scaled = merged.to(torch.float32) * (1.0 / output_scale.to(torch.float32).reshape(()))
        scaled = torch.where(scaled.isnan(), torch.full_like(scaled, FP8_MAX), scaled)
        out = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return out, lse.to(torch.float32)


def _merge_cpu(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
               prefill_tokens_with_context=None, output_scale=None) -> None:
    """CPU kernel of the registered op: the reference, written into the outputs."""
    _, n, h, d, p, _ = _check(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                              prefill_tokens_with_context, output_scale)
    out, lse = merge_attn_states_ref(prefix_output, prefix_lse, suffix_output, suffix_lse, p, output_scale)
    output.copy_(out)
    if output_lse is not None:
        output_lse.copy_(lse)


_OP = register_op(SCHEMA, cuda=_merge_cuda, cpu=_merge_cpu)


# ---- public entry point ----------------------------------------------------------------------------------


def merge_attn_states(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                      prefill_tokens_with_context=None, output_scale=None) -> None:
    """Merge two partial attention results in place of `output` (and `output_lse`).

    Args (n tokens, h heads, d head size; torch tensors, CUDA or CPU, or CuPy arrays, one kind per call):
        output: [n, h, d], prefix_output's dtype, or float8_e4m3fn when output_scale is given. Written.
        output_lse: [h, n] float32, or None. Written.
        prefix_output, suffix_output: [n, h, d] float32, float16 or bfloat16.
        prefix_lse, suffix_lse: [h, n] float32, natural-log LSE; +-inf means that side saw no keys.
        prefill_tokens_with_context: tokens [0, p) are merged, later ones copy the suffix; None means n.
        output_scale: 1-element float32 static FP8 scale (output = value / scale), read on the device.

    Eager CUDA calls launch directly (no dispatcher); under torch.compile this is torch.ops.cupy_ops.merge_attn_states.
    """
    if isinstance(output, torch.Tensor):
        if torch.compiler.is_compiling():
            _OP(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                prefill_tokens_with_context, output_scale)
        elif output.is_cuda:
            _merge_cuda(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                        prefill_tokens_with_context, output_scale)
        else:
            _merge_cpu(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                       prefill_tokens_with_context, output_scale)
    elif arrays.is_cupy_array(output):
        _merge_cupy(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                    prefill_tokens_with_context, output_scale)
    else:
        raise TypeError(f"{OP}: output must be a torch.Tensor or a cupy.ndarray, got {type(output).__name__}")
