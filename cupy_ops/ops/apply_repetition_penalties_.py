"""apply_repetition_penalties_: vLLM's repetition penalty, in place on the logits.

    logits[s, t] = x / p[s] if x > 0 else x * p[s],   x = logits[s, t], p = repetition_penalties,

wherever prompt_mask[s, t] or output_mask[s, t] is set (float32 math, rounded to the logits' dtype; strict
> 0, so 0, negatives, -inf and NaN are multiplied). Spec: ../shared/specs/sampler_ops.md section 1.

Same schema and math as vLLM 0.33 (`torch.ops._C.apply_repetition_penalties_`), bit for bit, except:
- logits may have any strides, and the masks any row stride and start (last stride 1): vLLM needs all four
  tensors contiguous (its Python wrapper falls back to torch otherwise);
- repetition_penalties may be float32 with fp16/bf16 logits (vLLM reads them as the logits' dtype unchecked);
- num_seqs = 0 and vocab = 0 launch nothing (vLLM divides by zero on the host at vocab = 0);
- bf16 logits, any shape, dtype or device mismatch and a mask that overlaps the logits are checked before
  anything is written.
"""

from __future__ import annotations

import torch

from .._runtime import Call, Kernel, Launch, LaunchConfig, Op, TensorArg, fast_divmod, launcher
from .._runtime import params as P

DTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
MASK_VECTOR_BYTES = (16, 8, 4, 2, 1)
THREADS = 128  # kRepetitionPenaltyThreads in the .cu: 4 warps, each a chunk of 32 * W tokens at a time
_INT32_LIMIT = 1 << 31  # chunks are split into (row, chunk of the row) with 32-bit fast_divmod

# Calls whose logits take at most this many bytes read all of them with the masks (one round trip, not two: the
# kernel's SPECULATE); 2 MiB move in ~0.5 us at the H200's 4.2 TB/s, about one DRAM round trip.
SPECULATE_MAX_BYTES = 2 << 20
# Such calls also take narrower chunks (32 x 4 tokens a warp): 4x the warps, each with a quarter of the serial
# division work (H200, 1 x 151936 dense fp32 / bf16: 3.2 / 3.3 us at 4 bytes, 3.5 / 3.4 at 8, 4.0 / 4.1 at 16;
# vLLM's kernel 3.5-3.6 / 3.7-3.8; other small shapes not measured). Large calls keep 16: at 4 bytes, 256 x 151936
# at 1% took 79 us instead of 55.
SPECULATE_MAX_VECTOR = 4
# (logits dtype, mask vector bytes, logits' last stride is 1, speculate) -> Kernel. Logits with another last stride
# are uncoalesced anyway: they get one kernel per dtype, with 1-byte mask loads and no speculation. Speculating
# kernels exist for mask vectors of up to SPECULATE_MAX_VECTOR bytes.
KERNELS = {(dtype, w, unit, spec): Kernel("repetition_penalties.cu", "cupy_ops::repetition_penalties_kernel<"
                                          f"{name}, {w}, {str(unit).lower()}, {str(spec).lower()}>")
           for dtype, name in DTYPES.items() for w in MASK_VECTOR_BYTES for unit in (True, False)
           for spec in (False, True)
           if (unit or w == 1) and (unit or not spec) and (not spec or w <= SPECULATE_MAX_VECTOR)}
PARAMS = P.CStruct("RepetitionPenaltiesParams", [
    P.ptr("logits"), P.ptr("prompt_mask"), P.ptr("output_mask"), P.ptr("penalties", "repetition_penalties"),
    P.i64("num_seqs"), P.i64("vocab"), P.i64("logits_stride", 2), P.i64("prompt_stride"), P.i64("output_stride"),
    P.i64("penalties_stride"), P.i64("num_chunks"), P.fast_divmod("chunks_per_row"), P.i32("penalties_fp32"),
])


def mask_vector_bytes(c: Call) -> int:
    """The widest mask load (16 bytes down to 1) at which both masks' rows are aligned together: the kernel
    aligns vectors to the prompt row, so the output row must start at the same address mod W in every row."""
    rows = c.dims["num_seqs"]
    pm, om = c.prompt_mask, c.output_mask
    skew = (pm.align - om.align) | ((pm.strides[0] - om.strides[0]) if rows > 1 else 0)
    return next(w for w in MASK_VECTOR_BYTES if skew % w == 0)


def _chunks_per_row(vocab: int, w: int) -> int:
    """Warp chunks (32 * w tokens) a row needs: its ceil((vocab + skew) / w) vectors, skew < w."""
    return -(-((vocab + w - 2) // w + 1) // 32)


def check(c: Call) -> None:
    """Chunk indices within fast_divmod's 32 bits."""
    if c.dims["num_seqs"] * _chunks_per_row(c.dims["vocab"], 1) >= _INT32_LIMIT:
        c.reject("logits", f"has {c.dims['num_seqs']} x {c.dims['vocab']} tokens; at most ~2^36 are supported")


def plan(c: Call) -> list:
    rows, vocab = c.dims["num_seqs"], c.dims["vocab"]
    if rows == 0 or vocab == 0:
        return []
    unit = vocab == 1 or c.logits.strides[1] == 1
    speculate = unit and rows * vocab * c.logits.itemsize <= SPECULATE_MAX_BYTES
    w = min(mask_vector_bytes(c), SPECULATE_MAX_VECTOR if speculate else 16) if unit else 1
    kernel = KERNELS[c.logits.dtype, w, unit, speculate]
    per_row = _chunks_per_row(vocab, w)
    chunks = rows * per_row
    warps = THREADS // 32
    # A resident grid (every block on an SM at once) that strides over the chunks: each warp loads its next
    # chunk's masks before this chunk's logits. Fewer blocks when there is less work than that.
    resident = launcher.device_attribute(c.device, "sm_count") * max(1, launcher.occupancy(kernel, c.device,
                                                                                           THREADS))
    grid = min(-(-chunks // warps), resident)
    values = {"num_seqs": rows, "vocab": vocab, "logits_stride": c.logits.strides,
              "prompt_stride": c.prompt_mask.strides[0], "output_stride": c.output_mask.strides[0],
              "penalties_stride": c.repetition_penalties.strides[0], "num_chunks": chunks,
              "chunks_per_row": fast_divmod(per_row),
              "penalties_fp32": int(c.repetition_penalties.dtype == torch.float32)}
    return [Launch(kernel, LaunchConfig((grid, 1, 1), (THREADS, 1, 1)), PARAMS, values)]


def apply_repetition_penalties_ref(logits, prompt_mask, output_mask, repetition_penalties, *,
                                   compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor]:
    """(new logits [num_seqs, vocab],): x > 0 ? x / p : x * p in `compute_dtype` where either mask
    [num_seqs, vocab] is set, rounded to the logits' dtype; other elements keep their bits. Penalties
    [num_seqs]."""
    x = logits.to(compute_dtype)
    p = repetition_penalties.to(compute_dtype).unsqueeze(-1)
    penalized = torch.where(x > 0, x / p, x * p).to(logits.dtype)
    return (torch.where(prompt_mask | output_mask, penalized, logits),)


def examples(device: str) -> list[tuple[str, tuple]]:
    """Random calls for `python -m cupy_ops check`: each dtype at 1% mask density, contiguous (vLLM's layout),
    and with masks sliced out of wider rows (unaligned starts) and float32 penalties."""
    cases = []
    for dtype in DTYPES:
        for rows, vocab, sliced in ((8, 151936, False), (37, 1019, True)):
            logits = torch.randn(rows, vocab, device=device).to(dtype)
            # Sliced: rows 1024 bytes apart starting 3 and 1 bytes in (2-byte mask loads); else vocab apart.
            prompt, output = ((torch.rand(rows, vocab + 5, device=device) < 0.01)[:, start:start + vocab]
                              if sliced else torch.rand(rows, vocab, device=device) < 0.01 for start in (3, 1))
            penalties = torch.rand(rows, device=device) + 0.5
            label = f"{str(dtype)[6:]} {rows}x{vocab}{' sliced masks, float32 penalties' if sliced else ''}"
            cases.append((label, (logits, prompt, output, penalties if sliced else penalties.to(dtype))))
    return cases


OP = Op(
    "apply_repetition_penalties_(Tensor! logits, Tensor prompt_mask, Tensor output_mask, "
    "Tensor repetition_penalties) -> ()",
    tensors=[  # validation order: logits fixes num_seqs and vocab
        TensorArg("logits", "inout", ("num_seqs", "vocab"), tuple(DTYPES)),
        TensorArg("prompt_mask", "in", ("num_seqs", "vocab"), (torch.bool,), unit_last_stride=True, aligned=True),
        TensorArg("output_mask", "in", ("num_seqs", "vocab"), (torch.bool,), unit_last_stride=True, aligned=True),
        TensorArg("repetition_penalties", "in", ("num_seqs",), ("logits", torch.float32)),
    ],
    kernels=KERNELS.values(), params=PARAMS, check=check, plan=plan, reference=apply_repetition_penalties_ref,
    examples=examples, doc=__doc__,
)
apply_repetition_penalties_ = OP.public
