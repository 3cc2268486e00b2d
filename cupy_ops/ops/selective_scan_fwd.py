"""selective_scan_fwd: the Mamba-1 selective scan (vLLM 0.33's op, in place), and `selective_scan_fn`.

Per sequence, channel c (group g(c) = c // (d / g)), state k and token t, in float32:

    dt = delta[c, t] + delta_bias[c];  dt = log1p(exp(dt)) if delta_softplus and dt <= 20
    h[c, k] = exp(dt A[c, k]) h[c, k] + dt B[g(c), k, t] u[c, t]
    y[c, t] = sum_k C[g(c), k, t] h[c, k] + D[c] u[c, t]
    delta[c, t] <- y;   z[c, t] <- y z sigmoid(z) (when z is given);   ssm_states[slot] <- h

Layouts: batched u, delta, z [b, d, L], B, C [b, g, n, L]; varlen (query_start_loc [b + 1] int32 given) u, delta,
z [d, T], B, C [g, n, T]. A [d, n], D, delta_bias [d] float32; ssm_states [slots, d, n] of the input dtype or
float32; n <= 256. Spec: ../shared/specs/selective_scan_fwd.md.

State cache. Plain mode: sequence s uses slot cache_indices[s] (or s); the initial state is read when
has_initial_state[s], the final state written after the last token. Prefix-cache mode (block_idx_first_scheduled_token
given; cache_indices [b, max_blocks]): the initial state comes from cache_indices[s, initial_state_idx[s]], the
running position starts at block_idx_first_scheduled_token[s] * block_size, the state after each chunk (block_size
tokens, or cu_chunk_seqlen's chunks, a partial first chunk filling an already started block) but the last goes to
cache_indices[s, (position after the chunk - 1) // block_size], and the final state to
cache_indices[s, block_idx_last_scheduled_token[s]], in that order: a slot stored more than once (cu_chunk_seqlen
chunks shorter than block_size end in one block; the final state's column) holds the last state stored there, as
in vLLM, although the chunked plan scans a sequence's chunks in parallel (a store that a later one overwrites is
not made). A sequence whose (initial-state) slot is null_block_id is padding: none of its outputs or states is read
or written. Without cache_indices null_block_id is unused (as vLLM: sequence s reads and writes slot s even when
s == null_block_id; the kernel gets -1, which no slot equals).

Same schema, argument order and in-place outputs as vLLM 0.33 (`torch.ops._C.selective_scan_fwd`), except where
vLLM's kernel is wrong (the spec's hazards):
1. Prefix-cache chunks of any block_size (vLLM skips the tokens of chunks longer than its 2048-token tile).
2. Every row, of any length, stride and alignment, is read and written inside its bounds (vLLM's fast path
   loads past rows whose length fills whole tiles).
3. Without cu_chunk_seqlen the running position starts at block_idx_first_scheduled_token[s] * block_size (vLLM
   starts at 0 and overwrites the slot of a cached prefix block).
4. Prefix-cache mode requires cache_indices, block_idx_last_scheduled_token and initial_state_idx (vLLM writes
   no state without cache_indices and reads slot 0).
5. Checked before any launch: shapes (d % g, ssm_states 3-D, every metadata length), dtypes (int32 metadata,
   bool has_initial_state), n <= 256, slots >= b without cache_indices. On the device every slot and column is
   bounds-checked: a slot outside ssm_states (other than null_block_id) is neither read (zero initial state)
   nor written, and the null block is never written (vLLM writes it; null_block_id = -1 from older callers
   would index out of bounds).
Also: empty sequences read and write nothing (as vLLM); any length (> 65535 included) and strides of the batch and
channel dims; tokens of varlen calls outside [query_start_loc[0], query_start_loc[b]) are left alone.
Caller's contract (device data is never read on the host): query_start_loc is non-decreasing and within T,
cu_chunk_seqlen's chunks of each sequence sum to its length, sequences use distinct slots, and a prefix-cache row of
cache_indices names a slot in one column only (a block table). Breaking it gives wrong values but never an access
out of bounds. In plain mode block_size and the prefix-cache tensors are ignored (their shapes are still checked).
"""

from __future__ import annotations

import torch

from .._runtime import Call, Kernel, Launch, LaunchConfig, Op, Scratch, TensorArg, dtype_name, launcher
from .._runtime import params as P
from .selective_scan_ref import selective_scan_fn as _selective_scan_fn
from .selective_scan_ref import selective_scan_fwd_ref

DTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
F32, I32 = (torch.float32,), (torch.int32,)
MAX_DSTATE = 256
SOURCE = "selective_scan.cu"
# Chunk kernel: 4 warps x 4 channels, each channel 8 lanes x ITEM_BYTES of tokens (kLanes, kChannels in the .cu),
# registers for MIN_BLOCKS blocks per SM (2: up to 255 registers for 16-bit inputs at 32 bytes, no spills). 16 bytes
# with 4 blocks per SM (and more chunking) was 1.4x slower at b1 L2048-8192 and n128, faster only at b8 (H200, before
# d8d5a0f).
THREADS, CHANNELS_PER_BLOCK, LANES = 128, 16, 8
MIN_BLOCKS, ITEM_BYTES = 2, 32
# Short kernel: batched plain calls of L <= 8 tokens (decode): 16 lanes per channel own the states.
SHORT_MAX_LEN, SHORT_CHANNELS_PER_BLOCK = 8, 8
# Cut long sequences into chunks scanned in parallel when fewer than this many warps per SM would have work: each
# warp keeps the MUFU (exp) pipe busy for ~60% of its time, so ~6 warps hide that; a chunked run does the
# crossing tokens' exps twice (pass 1 and pass 2), so it only pays where the GPU would otherwise idle.
MIN_WARPS_PER_SM = 6
# Fast windows stage B and C as float in shared memory, STAGE_STATES states at a time (a thread each), when every
# block's channels share one group (d / g a multiple of CHANNELS_PER_BLOCK); otherwise each of the block's 16
# channels loads and unpacks its own copy (H200, b1 d4096 n16 L2048 bf16: 114 us staged, 153 not).
STAGE_BC, STAGE_STATES = True, THREADS // LANES
_INT32_MAX = (1 << 31) - 1


def chunk_kernels(min_blocks: int, item_bytes: int) -> dict:
    """("chunk", dtype, pass1) -> the chunk kernel's instantiation."""
    return {("chunk", dtype, pass1): Kernel(SOURCE, f"cupy_ops::selective_scan_chunk_kernel<{name}, "
                                                    f"{str(pass1).lower()}, {min_blocks}, {item_bytes}>")
            for dtype, name in DTYPES.items() for pass1 in (False, True)}


KERNELS = {
    **chunk_kernels(MIN_BLOCKS, ITEM_BYTES),
    **{("short", dtype): Kernel(SOURCE, f"cupy_ops::selective_scan_short_kernel<{name}>")
       for dtype, name in DTYPES.items()},
    "carry": Kernel(SOURCE, "cupy_ops::selective_scan_carry_kernel"),
}


PARAMS = P.CStruct("SelectiveScanParams", [
        P.ptr("u"), P.ptr("delta"), P.ptr("A"), P.ptr("B"), P.ptr("C"), P.ptr("D", "D_"), P.ptr("z", "z_"),
        P.ptr("delta_bias", "delta_bias_"), P.ptr("query_start_loc"), P.ptr("cache_indices"),
        P.ptr("has_initial_state"), P.ptr("ssm_states"), P.ptr("block_idx_first", "block_idx_first_scheduled_token"),
        P.ptr("block_idx_last", "block_idx_last_scheduled_token"), P.ptr("initial_state_idx"),
        P.ptr("cu_chunk_seqlen"), P.ptr("last_chunk_indices"), P.ptr("scratch"),
        P.i64("batch"), P.i64("dim"), P.i64("dstate"), P.i64("seqlen"), P.i64("group_size"), P.i64("num_slots"),
        P.i64("max_blocks"), P.i64("null_block_id"), P.i64("block_size"), P.i64("cu_len"), P.i64("chunk_tokens"),
        P.i64("chunks_per_row"), P.i64("num_chunks"), P.i64("u_stride", 2), P.i64("delta_stride", 2),
        P.i64("z_stride", 2), P.i64("B_stride", 3), P.i64("C_stride", 3), P.i64("A_stride", 2), P.i64("D_stride"),
        P.i64("delta_bias_stride"), P.i64("state_stride", 3), P.i64("qsl_stride"), P.i64("ci_stride", 2),
        P.i64("his_stride"), P.i64("bif_stride"), P.i64("bil_stride"), P.i64("isi_stride"), P.i64("cu_stride"),
        P.i64("lci_stride"), P.u8("varlen"), P.u8("softplus"), P.u8("state_f32"), P.u8("cache_mode"),
        P.u8("vec_ok"), P.u8("chunked"), P.u8("stage_bc"),
])
# Unchunked plans need no scratch buffer: a 0-byte Scratch gives the field a null pointer and allocates nothing.
NO_SCRATCH = Scratch("scratch", 0)


def _varlen(c: Call) -> bool:
    return c.query_start_loc is not None


def num_sequences(c: Call) -> int:
    return c.query_start_loc.shape[0] - 1 if _varlen(c) else c.u.shape[0]


def check(c: Call) -> None:
    """Shapes by mode, the state cache's tensors, and the limits of the launch."""
    d, n = c.dims["d"], c.dims["n"]
    varlen = _varlen(c)
    if n > MAX_DSTATE:
        c.reject("A", f"has dstate n = {n}; at most {MAX_DSTATE} is supported")
    if varlen:
        if len(c.query_start_loc.shape) != 1 or c.query_start_loc.shape[0] < 1:
            c.reject("query_start_loc", f"must be 1-D [b + 1], got shape {c.query_start_loc.shape}")
        if len(c.u.shape) != 2 or c.u.shape[0] != d:
            c.reject("u", f"must be [d, T] = [{d}, T] with query_start_loc (varlen), got shape {c.u.shape}")
    elif len(c.u.shape) != 3 or c.u.shape[1] != d:
        c.reject("u", f"must be [b, d, L] with d = {d} (A's first dim), got shape {c.u.shape}")
    b, tokens = num_sequences(c), c.u.shape[-1]
    for name in ("delta", "z_"):
        t = getattr(c, name)
        if t is not None and t.shape != c.u.shape:
            c.reject(name, f"must have u's shape {c.u.shape}, got {t.shape}")
    for name in ("B", "C"):
        t = getattr(c, name)
        want = 3 if varlen else 4
        if len(t.shape) != want or t.shape[-2:] != (n, tokens) or (not varlen and t.shape[0] != b):
            layout = "[g, n, T]" if varlen else "[b, g, n, L]"
            c.reject(name, f"must be {layout} with n = {n}, {'T' if varlen else 'L'} = {tokens}"
                     f"{'' if varlen else f', b = {b}'}, got shape {t.shape}")
    g = c.B.shape[-3]
    if c.C.shape != c.B.shape:
        c.reject("C", f"must have B's shape {c.B.shape}, got {c.C.shape}")
    if g < 1 or d % g:
        c.reject("B", f"has {g} groups, which must divide d = {d}")
    st = c.ssm_states
    if len(st.shape) != 3 or st.shape[1:] != (d, n):
        c.reject("ssm_states", f"must be [slots, d, n] = [slots, {d}, {n}], got shape {st.shape}")
    if st.dtype not in (c.u.dtype, torch.float32):
        wanted = "float32" if c.u.dtype == torch.float32 else f"u's dtype ({dtype_name(c.u.dtype)}) or float32"
        c.reject("ssm_states", f"must be {wanted}, got {dtype_name(st.dtype)}", TypeError)
    for name in ("has_initial_state", "block_idx_first_scheduled_token", "block_idx_last_scheduled_token",
                 "initial_state_idx", "last_chunk_indices"):
        t = getattr(c, name)
        if t is not None and t.shape != (b,):
            c.reject(name, f"must be [b] = [{b}], got shape {t.shape}")
    if c.cu_chunk_seqlen is not None and len(c.cu_chunk_seqlen.shape) != 1:  # (its stride is read in any mode)
        c.reject("cu_chunk_seqlen", f"must be 1-D [chunks + 1], got shape {c.cu_chunk_seqlen.shape}")
    if not -_INT32_MAX - 1 <= c.null_block_id <= _INT32_MAX:  # compared with int32 slots
        c.reject("null_block_id", f"= {c.null_block_id} must fit int32 (cache slots are int32)")
    ci = c.cache_indices
    if c.block_idx_first_scheduled_token is not None:  # prefix-cache mode
        for name in ("cache_indices", "block_idx_last_scheduled_token", "initial_state_idx"):
            if getattr(c, name) is None:
                c.reject(name, "is required in prefix-cache mode (block_idx_first_scheduled_token given)")
        if len(ci.shape) != 2 or ci.shape[0] != b:
            c.reject("cache_indices", f"must be [b, max_blocks] = [{b}, max_blocks] in prefix-cache mode, got "
                     f"shape {ci.shape}")
        if c.block_size < 1:
            c.reject("block_size", f"must be >= 1 in prefix-cache mode, got {c.block_size}")
        if c.block_size > _INT32_MAX:
            c.reject("block_size", f"= {c.block_size}; at most 2^31 - 1 is supported")
        if (c.cu_chunk_seqlen is None) != (c.last_chunk_indices is None):
            c.reject("cu_chunk_seqlen", "and last_chunk_indices must be given together")
    elif ci is not None and ci.shape != (b,):
        c.reject("cache_indices", f"must be [b] = [{b}] (plain mode), got shape {ci.shape}")
    elif ci is None and st.shape[0] < b:
        c.reject("ssm_states", f"has {st.shape[0]} slots; without cache_indices sequence s uses slot s, so it "
                 f"needs b = {b}")
    if b > _INT32_MAX:
        c.reject("query_start_loc" if varlen else "u", f"gives {b} sequences; at most 2^31 - 1 are supported")
    if tokens > _INT32_MAX:
        c.reject("u", f"has {tokens} tokens {'in all' if varlen else 'a sequence'}; at most 2^31 - 1 are supported")
    if -(-d // CHANNELS_PER_BLOCK) > 65535:
        c.reject("A", f"has d = {d} channels; at most {65535 * CHANNELS_PER_BLOCK} are supported")


def _row_strides(t, varlen: bool, dims: int) -> tuple:
    """(sequence, ...) strides of a token tensor with the token dim dropped; the sequence stride is 0 for varlen
    tensors (tokens are indexed in T) and for absent ones."""
    if t is None:
        return (0,) * dims
    strides = t.strides[:-1]
    return ((0,) + strides) if varlen else strides


def _vector_ok(c: Call, varlen: bool) -> bool:
    """16-byte loads: every row of u, delta, z, B, C starts 16-byte aligned (pointers, and strides of dims longer
    than 1 in whole vectors)."""
    per_vector = 16 // c.u.itemsize
    for t in (c.u, c.delta, c.z_, c.B, c.C):
        if t is None:
            continue
        if t.align or any(s % per_vector for size, s in zip(t.shape[:-1], t.strides[:-1]) if size > 1):
            return False
    return True


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _one(t, axis: int = 0) -> int:
    return 0 if t is None else t.strides[axis]


def plan(c: Call) -> list:
    varlen, b, d, n = _varlen(c), num_sequences(c), c.dims["d"], c.dims["n"]
    tokens = c.u.shape[-1]
    if b == 0 or d == 0 or tokens == 0:
        return []
    dtype, cache_mode = c.u.dtype, c.block_idx_first_scheduled_token is not None
    ci = c.cache_indices
    group_size = d // c.B.shape[-3]  # channels sharing one B/C group
    values = dict(
        batch=b, dim=d, dstate=n, seqlen=tokens, group_size=group_size, num_slots=c.ssm_states.shape[0],
        max_blocks=ci.shape[1] if cache_mode else 1, null_block_id=c.null_block_id if ci is not None else -1,
        block_size=c.block_size if cache_mode else 1,
        cu_len=c.cu_chunk_seqlen.shape[0] if cache_mode and c.cu_chunk_seqlen is not None else 0,
        u_stride=_row_strides(c.u, varlen, 2), delta_stride=_row_strides(c.delta, varlen, 2),
        z_stride=_row_strides(c.z_, varlen, 2), B_stride=_row_strides(c.B, varlen, 3),
        C_stride=_row_strides(c.C, varlen, 3), A_stride=c.A.strides, D_stride=_one(c.D_),
        delta_bias_stride=_one(c.delta_bias_), state_stride=c.ssm_states.strides, qsl_stride=_one(c.query_start_loc),
        ci_stride=(0, 0) if ci is None else (ci.strides[0], ci.strides[1] if len(ci.shape) == 2 else 0),
        his_stride=_one(c.has_initial_state), bif_stride=_one(c.block_idx_first_scheduled_token),
        bil_stride=_one(c.block_idx_last_scheduled_token), isi_stride=_one(c.initial_state_idx),
        cu_stride=_one(c.cu_chunk_seqlen), lci_stride=_one(c.last_chunk_indices), varlen=varlen,
        softplus=c.delta_softplus, state_f32=c.ssm_states.dtype == torch.float32, cache_mode=cache_mode,
        vec_ok=_vector_ok(c, varlen), chunked=False, chunk_tokens=tokens, chunks_per_row=1, num_chunks=b,
        stage_bc=STAGE_BC and group_size % CHANNELS_PER_BLOCK == 0,
    )
    blocks = b * -(-d // SHORT_CHANNELS_PER_BLOCK)
    # The short kernel's grid is one-dimensional; past CUDA's 2^31 - 1 blocks the chunk kernel (grid b x d / 16)
    # takes the call.
    if not varlen and not cache_mode and tokens <= SHORT_MAX_LEN and blocks <= _INT32_MAX:
        return [NO_SCRATCH, Launch(KERNELS["short", dtype], LaunchConfig((blocks, 1, 1), (THREADS, 1, 1)), PARAMS,
                                   values)]
    window = LANES * (ITEM_BYTES // c.u.itemsize)
    rows = 1 if varlen else b
    channel_blocks = -(-d // CHANNELS_PER_BLOCK)
    warps = rows * channel_blocks * (THREADS // 32)
    wanted = MIN_WARPS_PER_SM * launcher.device_attribute(c.device, "sm_count")
    per_row = 1 if warps >= wanted else min(-(-wanted // warps), -(-tokens // window), 65535)
    chunk_tokens = _ceil(_ceil(tokens, per_row), window) * window
    per_row = -(-tokens // chunk_tokens)
    chunks = rows * per_row
    values.update(chunk_tokens=chunk_tokens, chunks_per_row=per_row, num_chunks=chunks, chunked=per_row > 1)
    table_bytes = (THREADS // 32) * (2 * window * 4 + window)
    staged_bytes = 2 * STAGE_STATES * window * 4 if values["stage_bc"] else 0
    smem = 3 * CHANNELS_PER_BLOCK * n * 4 + staged_bytes + table_bytes  # carry in and out, A log2 e, B C, events
    scan = LaunchConfig((chunks, channel_blocks, 1), (THREADS, 1, 1), smem)
    if per_row == 1:
        return [NO_SCRATCH, Launch(KERNELS["chunk", dtype, False], scan, PARAMS, values)]
    scratch_floats = chunks * (2 * d * n + d + 1)
    return [Scratch("scratch", 4 * scratch_floats),
            Launch(KERNELS["chunk", dtype, True], scan, PARAMS, values),
            Launch(KERNELS["carry"], LaunchConfig((-(-(d * n) // 256) or 1, rows, 1), (256, 1, 1)), PARAMS, values),
            Launch(KERNELS["chunk", dtype, False], scan, PARAMS, values)]


def examples(device: str) -> list[tuple[str, tuple]]:
    """Random calls for `python -m cupy_ops check`: batched bf16 with every option, a decode-like batch, varlen
    fp16 with padding and initial states, and prefix-cache mode with cu_chunk_seqlen (fp32)."""
    from .selective_scan_ref import random_call  # the tests' generator, small shapes

    return [
        ("batched bf16 b2 d40 n16 L300, z D bias softplus",
         random_call(device, torch.bfloat16, b=2, d=40, n=16, L=300)),
        ("batched fp32 b5 d24 n8 L3 (decode)", random_call(device, torch.float32, b=5, d=24, n=8, L=3)),
        ("varlen fp16 lengths 1 70 0 200, null slot", random_call(device, torch.float16, d=24, n=16,
                                                                  lengths=[1, 70, 0, 200], pad=1)),
        ("prefix-cache fp32 block 32 with cu_chunk_seqlen", random_call(device, torch.float32, d=20, n=8,
                                                                       lengths=[90, 5, 64], block_size=32,
                                                                       cache=True, cu_chunks=True)),
    ]


OP = Op(
    "selective_scan_fwd(Tensor! u, Tensor! delta, Tensor! A, Tensor! B, Tensor! C, Tensor? D_, Tensor!? z_, "
    "Tensor? delta_bias_, bool delta_softplus, Tensor? query_start_loc, Tensor? cache_indices, "
    "Tensor? has_initial_state, Tensor! ssm_states, int null_block_id, int block_size, "
    "Tensor? block_idx_first_scheduled_token, Tensor? block_idx_last_scheduled_token, Tensor? initial_state_idx, "
    "Tensor? cu_chunk_seqlen, Tensor? last_chunk_indices) -> ()",
    tensors=[  # validation order: A binds d and n
        # vLLM's schema marks u, A, B and C written (`Tensor!`); the kernels only read them: "in".
        TensorArg("A", "in", ("d", "n"), F32),
        TensorArg("u", "in", None, tuple(DTYPES), unit_last_stride=True, aligned=True),
        TensorArg("delta", "inout", None, "u", unit_last_stride=True, aligned=True),
        TensorArg("B", "in", None, "u", unit_last_stride=True, aligned=True),
        TensorArg("C", "in", None, "u", unit_last_stride=True, aligned=True),
        TensorArg("D_", "in", ("d",), F32),
        TensorArg("z_", "inout", None, "u", unit_last_stride=True, aligned=True),
        TensorArg("delta_bias_", "in", ("d",), F32),
        TensorArg("query_start_loc", "in", None, I32),
        TensorArg("cache_indices", "in", None, I32),
        TensorArg("has_initial_state", "in", None, (torch.bool,)),
        TensorArg("ssm_states", "inout", None, None),
        TensorArg("block_idx_first_scheduled_token", "in", None, I32),
        TensorArg("block_idx_last_scheduled_token", "in", None, I32),
        TensorArg("initial_state_idx", "in", None, I32),
        TensorArg("cu_chunk_seqlen", "in", None, I32),
        TensorArg("last_chunk_indices", "in", None, I32),
    ],
    kernels=KERNELS.values(), params=PARAMS, check=check, plan=plan,
    reference=selective_scan_fwd_ref, examples=examples, doc=__doc__,
)
selective_scan_fwd = OP.public
selective_scan_fn = _selective_scan_fn
