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

import ctypes
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
# MergeAttnStatesParams, all 8-byte fields: 7 pointers and the prefill count change per call; 3 sizes,
# fast_divmod (3 words) and 6 stride pairs are fixed per layout, so each launch config packs them once and a
# call packs 9 values instead of 29.
_LAYOUT_TAIL = struct.Struct("<3q3Q12q")
_PARAMS = struct.Struct(f"<7Qq{_LAYOUT_TAIL.size}s")


def _vector_widths(dtype: torch.dtype) -> tuple[int, ...]:
    """Elements per thread per step that a dtype can use: 16 bytes down to one element."""
    widest = 16 // torch.empty((), dtype=dtype).element_size()
    return tuple(w for w in (8, 4, 2, 1) if w <= widest)


def instantiations() -> list[tuple[str, str]]:
    """Every (source file, name expression) this op can launch; `warmup` and the compile tests use it."""
    return [(SOURCE, kernel.name_expression) for kernel in _KERNELS.values()]


# (input dtype, fp8 output, elements per vector, 64-bit offsets) -> Kernel
_KERNELS = {
    (dtype, fp8, vec, wide): _runtime.Kernel(
        SOURCE,
        f"cupy_ops::merge_attn_states_kernel<{_CUDA_TYPE[dtype]}, "
        f"{'cupy_ops::fp8_e4m3' if fp8 else _CUDA_TYPE[dtype]}, {vec}, {'true' if wide else 'false'}>",
    )
    for dtype in INPUT_DTYPES
    for fp8 in (False, True)
    for vec in _vector_widths(dtype)
    for wide in (False, True)
}


# ---- validation ------------------------------------------------------------------------------------------
#
# `_check` validates every argument (torch tensors, CPU or CUDA, or CuPy arrays), explains every rejection, and
# returns the launch description as plain values (a NamedTuple per tensor costs ~0.4 us):
#   (device, dtype, fp8, n, h, d, p, out_ptr, out_strides, lse_ptr, lse_strides, prefix_ptr, prefix_strides,
#    prefix_lse_ptr, prefix_lse_strides, suffix_ptr, suffix_strides, suffix_lse_ptr, suffix_lse_strides, scale_ptr)
# The CUDA path (`_merge_function`: the public function and the op's CUDA kernel) remembers the layouts `_check`
# accepted, so a repeated layout is validated by one dict lookup plus the checks that depend on the call's
# pointers and prefill count.

_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
_F32 = torch.float32


def _check(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
           prefill_tokens_with_context, output_scale) -> tuple:
    """Validate every argument (torch tensors, CPU or CUDA, or CuPy arrays); raise before any launch."""
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
        if tuple(info.shape) != tuple(po.shape):
            raise ValueError(f"{OP}: {name} has shape {tuple(info.shape)}, expected {tuple(po.shape)} "
                             "like prefix_output")
    for name, info in (("prefix_lse", pl), ("suffix_lse", sl), ("output_lse", out_lse)):
        if info is None:
            continue
        if tuple(info.shape) != (h, n):
            raise ValueError(f"{OP}: {name} has shape {tuple(info.shape)}, expected [num_heads, num_tokens] "
                             f"= {(h, n)}")
        if info.dtype != _F32:
            raise TypeError(f"{OP}: {name} must be float32, got {info.dtype}")

    if po.dtype not in INPUT_DTYPES:
        raise TypeError(f"{OP}: prefix_output must be float32, float16 or bfloat16, got {po.dtype}")
    if so.dtype != po.dtype:
        raise TypeError(f"{OP}: suffix_output dtype {so.dtype} differs from prefix_output dtype {po.dtype}")
    fp8 = scale is not None
    if fp8:
        if out.dtype != FP8_DTYPE:
            raise TypeError(f"{OP}: with output_scale, output must be float8_e4m3fn, got {out.dtype}")
        if scale.dtype != _F32 or len(scale.shape) > 1 or _numel(scale.shape) != 1:
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
    no_lse = out_lse is None
    return (device, po.dtype, fp8, n, h, d, p, out.ptr, out.strides, 0 if no_lse else out_lse.ptr,
            (0, 0) if no_lse else out_lse.strides, po.ptr, po.strides, pl.ptr, pl.strides, so.ptr, so.strides,
            sl.ptr, sl.strides, 0 if scale is None else scale.ptr)


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
        same_view = info.ptr == out.ptr and tuple(info.strides) == tuple(out.strides) and info.dtype == out.dtype
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

_INT32_LIMIT = 1 << 31
_MAX_CACHED_CONFIGS = 4096
# Launch configurations by layout: (device, dtype, fp8, n, h, d, six stride pairs, pointer alignments)
# -> (CUfunction, grid, block_x, block_y, packed constant tail of the params struct). A repeated layout skips
# ~3 us of Python arithmetic per call (and the compile-or-load lookup: building a config loads the kernel).
_configs: dict[tuple, tuple] = {}


def _launch_config(key: tuple) -> tuple:
    device, dtype, fp8, n, h, d, out_st, lse_st, po_st, pl_st, so_st, sl_st, in_align, out_align = key
    itemsize = _ITEMSIZE[dtype]
    widest = 16 // itemsize
    # Largest vector every row start is aligned to (strides in elements, pointers in bytes).
    misalign = (out_st[0] | out_st[1] | po_st[0] | po_st[1] | so_st[0] | so_st[1] | (in_align // itemsize)
                | (out_align if fp8 else out_align // itemsize))
    vec = widest if misalign == 0 else min(widest, misalign & -misalign)
    while vec > max(d, 1):
        vec //= 2
    # d = 0 still launches one thread per row when output_lse is given: the merged lse is defined.
    threads_per_row = max(1, min(-(-d // vec), _MAX_THREADS_PER_ROW))
    rows_per_block = max(1, THREADS_PER_BLOCK // threads_per_row)
    rows = n * h
    # 32-bit offsets unless a row index or some element offset can reach 2^31 (vllm#45500 overflowed there).
    reach = ((n - 1) * (abs(out_st[0]) + abs(po_st[0]) + abs(so_st[0]) + abs(lse_st[1]) + abs(pl_st[1])
                        + abs(sl_st[1]))
             + (h - 1) * (abs(out_st[1]) + abs(po_st[1]) + abs(so_st[1]) + abs(lse_st[0]) + abs(pl_st[0])
                          + abs(sl_st[0])) + d)
    wide = rows >= _INT32_LIMIT or reach >= _INT32_LIMIT
    tail = _LAYOUT_TAIL.pack(rows, h, d, *_runtime.fast_divmod(h), *out_st[:2], *po_st[:2], *so_st[:2], *lse_st,
                             *pl_st, *sl_st)
    function = _KERNELS[dtype, fp8, vec, wide].function(device)
    config = (function, -(-rows // rows_per_block), threads_per_row, rows_per_block, tail)
    if len(_configs) >= _MAX_CACHED_CONFIGS:
        _configs.clear()
    _configs[key] = config
    return config


def _config_for(args: tuple) -> tuple | None:
    """(CUfunction, grid, block_x, block_y, params tail) for a `_check` result, or None: nothing to write (a
    zero grid would still run one block)."""
    (device, dtype, fp8, n, h, d, _, out_ptr, out_st, lse_ptr, lse_st, po_ptr, po_st, _, pl_st,
     so_ptr, so_st, _, sl_st, _) = args
    if n == 0 or h == 0 or (d == 0 and lse_ptr == 0):
        return None
    key = (device, dtype, fp8, n, h, d, out_st, lse_st, po_st, pl_st, so_st, sl_st, (po_ptr | so_ptr) & 15,
           out_ptr & 15)
    return _configs.get(key) or _launch_config(key)


def _launch(args: tuple, stream: int) -> None:
    (device, dtype, fp8, n, h, d, p, out_ptr, out_st, lse_ptr, lse_st, po_ptr, po_st, pl_ptr, pl_st,
     so_ptr, so_st, sl_ptr, sl_st, scale_ptr) = args
    config = _config_for(args)
    if config is None:
        return
    function, grid, block_x, block_y, tail = config
    _runtime.launch(function, device, grid, block_x, block_y, stream, _PARAMS,
                    (out_ptr, lse_ptr, po_ptr, pl_ptr, so_ptr, sl_ptr, scale_ptr, p, tail))


# Layouts `_check` accepted on CUDA tensors: the metadata it decides from (shape, strides, dtype and device of
# every tensor, which optional ones are given, the pointers' 16-byte alignment) -> (metadata guard of the
# tensors that made it (`arrays.metadata_guard`, or None), alignment, device, n, CUfunction or None when there
# is nothing to launch, the CUfunction as a c_void_p for ctypes, grid, block_x, block_y, params
# tail, pack_into, byte span of output, output_lse, prefix_output, suffix_output, prefix_lse, suffix_lse).
# What depends on the call alone, the prefill count and the overlap of the tensors' memory, is checked per call;
# anything unusual (and a device that is not the current one) takes the full check.
_layouts: dict[tuple, tuple] = {}
# The layout the dict gave last (only one with a metadata guard): a call whose seven tensors pass its guard (in
# C++) and whose pointers have its alignment skips building the key, ~1.5 us of Python attribute reads.
_recent_layout: tuple | None = None
# Stand-ins for output_lse and output_scale when not given (`arrays.absent`: one each).
_NO_OUTPUT_LSE, _NO_OUTPUT_SCALE = arrays.absent(), arrays.absent()
_current_device = getattr(torch._C, "_cuda_getDevice", None)  # absent from CPU-only torch builds
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_is_compiling = torch.compiler.is_compiling
# A constant True while dynamo traces, else False: one Python call, where is_compiling() makes two.
_is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", _is_compiling)
_launcher = _runtime.launcher  # the hot path inlines its launch
_launch_buffers = _launcher.launch_buffers


def _merge_function(public: bool):
    """The public function (`public`: traced by torch.compile, torch.export or make_fx, it emits the registered
    op) or the op's CUDA kernel. One body for both on purpose: every Python call level costs ~0.2 us of a ~8 us
    call, and the CUDA kernel must never route to the op (torch.compile keeps its compiling flag set while it
    runs kernels to autotune)."""

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

        Eager CUDA calls launch directly (no dispatcher); under torch.compile this is
        torch.ops.cupy_ops.merge_attn_states.
        """
        if public and _is_dynamo_compiling() and isinstance(output, torch.Tensor):
            _OP(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                prefill_tokens_with_context, output_scale)
            return
        global _recent_layout
        po, pl, so, sl, p = prefix_output, prefix_lse, suffix_output, suffix_lse, prefill_tokens_with_context
        try:
            out_ptr, po_ptr, so_ptr, pl_ptr, sl_ptr = (output.data_ptr(), po.data_ptr(), so.data_ptr(),
                                                       pl.data_ptr(), sl.data_ptr())
            lse_ptr = 0 if output_lse is None else output_lse.data_ptr()
            alignment = ((po_ptr | so_ptr) & 15) << 4 | out_ptr & 15
            # The layout of the last call that took the dict: one C++ check of all seven metadata (consecutive
            # calls, e.g. the layers of one forward step, share a layout), else the dict.
            key, layout = None, _recent_layout
            if not (layout is not None and layout[1] == alignment
                    and layout[0](output, _NO_OUTPUT_LSE if output_lse is None else output_lse, po, pl, so, sl,
                                  _NO_OUTPUT_SCALE if output_scale is None else output_scale)):
                # `is_contiguous() or stride()`: True, or the strides. Contiguity ignores the stride of a size-1
                # dim, which only ever multiplies index 0, so contiguous tensors of one shape share a layout.
                key = (po.shape, po.dtype, po.get_device(), po.is_contiguous() or po.stride(),
                       so.shape, so.dtype, so.get_device(), so.is_contiguous() or so.stride(),
                       output.shape, output.dtype, output.get_device(),
                       output.is_contiguous() or output.stride(),
                       pl.shape, pl.dtype, pl.get_device(), pl.is_contiguous() or pl.stride(),
                       sl.shape, sl.dtype, sl.get_device(), sl.is_contiguous() or sl.stride(),
                       None if output_lse is None else (output_lse.shape, output_lse.dtype,
                                                        output_lse.get_device(),
                                                        output_lse.is_contiguous() or output_lse.stride()),
                       None if output_scale is None else (output_scale.shape, output_scale.dtype,
                                                          output_scale.get_device()),
                       alignment)
                layout = _layouts.get(key)
                if layout is not None and layout[0] is not None:
                    _recent_layout = layout
        except (AttributeError, TypeError, RuntimeError):  # not torch tensors, or fake ones: see `_merge_checked`
            key = layout = None
        if layout is not None:
            (_, _, device, n, function, function_ref, grid, block_x, block_y, tail, pack_params,
             out_span, lse_span, po_span, so_span, pl_span, sl_span) = layout
            if p is None:
                p = n
            out_end = out_ptr + out_span
            pl_end, sl_end = pl_ptr + pl_span, sl_ptr + sl_span
            po_end, so_end = po_ptr + po_span, so_ptr + so_span
            fits = (type(p) is int and 0 <= p <= n  # a bool or a float is not an int here
                    and not ((out_ptr < pl_end and pl_ptr < out_end) or (out_ptr < sl_end and sl_ptr < out_end)
                             or (out_ptr < po_end and po_ptr < out_end)
                             or (out_ptr < so_end and so_ptr < out_end)))
            if fits and lse_ptr:
                lse_end = lse_ptr + lse_span
                fits = not ((lse_ptr < pl_end and pl_ptr < lse_end) or (lse_ptr < sl_end and sl_ptr < lse_end)
                            or (lse_ptr < po_end and po_ptr < lse_end) or (lse_ptr < so_end and so_ptr < lse_end)
                            or (lse_ptr < out_end and out_ptr < lse_end))
            # Not fitting: an in-place output, an overlap or a bad count, which `_check` allows or explains.
            if fits and device == _current_device():
                if function is not None:  # `_runtime.launch`, inlined
                    buffers = _launch_buffers
                    pack_params(buffers.params, 0, out_ptr, lse_ptr, po_ptr, pl_ptr, so_ptr, sl_ptr,
                                0 if output_scale is None else output_scale.data_ptr(), p, tail)
                    stream = _current_raw_stream(device)
                    try:
                        cupy_launch_kernel = _launcher.cupy_launch_kernel
                        if cupy_launch_kernel is not None:
                            cupy_launch_kernel(function, grid, 1, 1, block_x, block_y, 1, 0, stream, buffers.argv, 0)
                        else:  # ctypes
                            config = buffers.config
                            _launcher.pack_launch_config(config, 0, grid, 1, 1, block_x, block_y, 1, 0, stream, 0, 0)
                            code = _launcher.cu_launch_kernel_ex(config, function_ref, buffers.argv_array, None)
                            if code:
                                raise _launcher.DriverError(code)
                    except Exception as exc:  # noqa: BLE001 - a driver error (.status), or this thread's first launch
                        _launcher.launch_failed(exc, function, device, grid, block_x, block_y, stream, buffers)
                return
        _merge_checked(public, key, output, output_lse, po, pl, so, sl, prefill_tokens_with_context, output_scale)

    return merge_attn_states


def _merge_checked(public, key, output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                   prefill_tokens_with_context, output_scale) -> None:
    """Every call the cached layouts do not cover: validate everything, then launch (torch CUDA tensors, CuPy
    arrays) or run the reference (CPU tensors). `key`: the call's layout key, remembered once it validates."""
    if public and isinstance(output, torch.Tensor) and (type(output) is not torch.Tensor or _is_compiling()):
        # Fake or functional tensors (torch.export, make_fx) or a call while torch.compile compiles: the
        # registered op, which tracing understands through its fake kernel.
        _OP(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse, prefill_tokens_with_context,
            output_scale)
        return
    if arrays.is_cupy_array(output):
        _merge_cupy(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                    prefill_tokens_with_context, output_scale)
        return
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{OP}: output must be a torch.Tensor or a cupy.ndarray, got {type(output).__name__}")
    if not output.is_cuda:
        _merge_cpu(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                   prefill_tokens_with_context, output_scale)
        return
    args = _check(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                  prefill_tokens_with_context, output_scale)
    device = args[0]
    if device == _current_device():
        _launch(args, _current_raw_stream(device))
    else:
        with torch.cuda.device(device):
            _launch(args, _current_raw_stream(device))
    if key is not None:
        _remember_layout(key, args, (output, _NO_OUTPUT_LSE if output_lse is None else output_lse, prefix_output,
                                     prefix_lse, suffix_output, suffix_lse,
                                     _NO_OUTPUT_SCALE if output_scale is None else output_scale))


_merge_cuda = _merge_function(public=False)


def _remember_layout(key: tuple, args: tuple, tensors: tuple) -> None:
    """Store what a call with this (already validated) layout needs; `_launch` built the config just before.
    `tensors`: the call's seven tensor arguments in guard order, the stand-ins for those not given."""
    device, dtype, fp8, n, h, d, _, _, out_st, lse_ptr, lse_st, _, po_st, _, pl_st, _, so_st, _, sl_st, _ = args
    itemsize = _ITEMSIZE[dtype]
    function, grid, block_x, block_y, tail = _config_for(args) or (None,) * 5  # None: nothing to launch
    nhd, hn, extent = (n, h, d), (h, n), arrays.byte_extent  # torch strides are >= 0: extents start at 0
    if len(_layouts) >= _MAX_CACHED_CONFIGS:
        _layouts.clear()
    _layouts[key] = (arrays.metadata_guard(*tensors), key[-1], device, n, function,
                     None if function is None else ctypes.c_void_p(function), grid, block_x,
                     block_y, tail, _PARAMS.pack_into,
                     extent(nhd, out_st, 1 if fp8 else itemsize)[1],
                     0 if lse_ptr == 0 else extent(hn, lse_st, 4)[1],
                     extent(nhd, po_st, itemsize)[1], extent(nhd, so_st, itemsize)[1],
                     extent(hn, pl_st, 4)[1], extent(hn, sl_st, 4)[1])


def _merge_cupy(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                prefill_tokens_with_context=None, output_scale=None) -> None:
    import cupy

    args = _check(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                  prefill_tokens_with_context, output_scale)
    with cupy.cuda.Device(args[0]):
        _launch(args, cupy.cuda.get_current_stream().ptr)


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
    p = _check(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
               prefill_tokens_with_context, output_scale)[6]
    out, lse = merge_attn_states_ref(prefix_output, prefix_lse, suffix_output, suffix_lse, p, output_scale)
    output.copy_(out)
    if output_lse is not None:
        output_lse.copy_(lse)


_OP = register_op(SCHEMA, cuda=_merge_cuda, cpu=_merge_cpu)


# ---- self-check (python -m cupy_ops check) ----------------------------------------------------------------


def _random_inputs(n: int, h: int, d: int, dtype: torch.dtype, device: str):
    """prefix/suffix [n, h, d] and lse [h, n] with ~10% infinite lse on each side (some rows both)."""
    prefix = torch.randn(n, h, d, device=device).to(dtype)
    suffix = torch.randn(n, h, d, device=device).to(dtype)
    prefix_lse = torch.randn(h, n, device=device) * 4
    suffix_lse = torch.randn(h, n, device=device) * 4
    prefix_lse[torch.rand(h, n, device=device) < 0.1] = float("inf")
    suffix_lse[torch.rand(h, n, device=device) < 0.1] = float("-inf")
    return prefix, prefix_lse, suffix, suffix_lse


def self_check(device: str) -> list[tuple[str, bool, str]]:
    """(case, passed, detail) for a few layouts per dtype, poisoned outputs vs the float64 reference."""
    from ..testing import mismatch

    results = []
    cases = [(dtype, fp8, layout) for dtype in INPUT_DTYPES for fp8 in (False, True)
             for layout in ("contiguous", "offset slice, d=80, p=n/2")]
    for dtype, fp8, layout in cases:
        n, h, d = (513, 8, 128) if layout == "contiguous" else (77, 5, 80)
        p = None if layout == "contiguous" else n // 2
        prefix, prefix_lse, suffix, suffix_lse = _random_inputs(n, h, d, dtype, device)
        out_dtype = FP8_DTYPE if fp8 else dtype
        scale = torch.tensor([0.05], device=device) if fp8 else None
        # A view one element into a poisoned buffer: unaligned, and it shows any write outside the view.
        buffer = torch.full((n * h * d + 1,), float("nan"), device=device).to(out_dtype)
        output = buffer[1:].view(n, h, d)
        output_lse = torch.full((h, n), float("nan"), device=device)
        merge_attn_states(output, output_lse, prefix, prefix_lse, suffix, suffix_lse, p, scale)
        expected, expected_lse = merge_attn_states_ref(prefix, prefix_lse, suffix, suffix_lse, p, scale,
                                                       compute_dtype=torch.float64)
        problem = (mismatch(output, expected, out_dtype) or mismatch(output_lse, expected_lse, torch.float32)
                   or (None if buffer[:1].float().isnan().all() else "wrote outside the output view"))
        name = f"{str(dtype).replace('torch.', '')}{' -> fp8' if fp8 else ''} {layout} [{n}x{h}x{d}] on {device}"
        results.append((name, problem is None, problem or "ok"))
    return results


# ---- public entry point ----------------------------------------------------------------------------------

merge_attn_states = _merge_function(public=True)
