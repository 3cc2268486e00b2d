"""Helpers of the selective_scan_fwd tests: one call checked against the float64 reference with the scan's error
bound, argument positions by name, outputs in guarded buffers, and the calls that the CPU, GPU and emulated tests
share for the docstring's promises (bad cache slots, CUDA-graph-padded varlen batches, the softplus threshold,
strided metadata and parameters).

Error bound (mamba's practice): an output element passes when it is within cupy_ops.testing.TOLERANCE of the
float64 reference, or, for float32 outputs, within 4x the largest error of the float32 reference itself (torch's
own error at that precision: after thousands of tokens a float32 scan drifts by more than a few ulps of the
result, and a parallel scan's rounding order differs from the sequential one's). 16-bit outputs are rounded
from float32 math, so TOLERANCE (one ulp) holds for them. NaN must match NaN.
"""

from __future__ import annotations

import pytest
import torch
from helpers import GUARD, SENTINEL, assert_bitwise_equal, assert_untouched, synchronize

from cupy_ops import testing
from cupy_ops.ops.selective_scan_fwd import OP
from cupy_ops.ops.selective_scan_ref import random_call

ARG = {name: i for i, name in enumerate(OP.arguments)}
# (argument, index of its new value in the reference's results)
OUTPUTS = (("delta", 1), ("z_", 5), ("ssm_states", 6))
BOUND_FACTOR = 4.0


def clone_args(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def with_args(args: tuple, **changes) -> tuple:
    out = list(args)
    for name, value in changes.items():
        out[ARG[name]] = value
    return tuple(out)


def scan_problem(got: torch.Tensor, gold: torch.Tensor, ref32: torch.Tensor) -> str | None:
    """What is wrong with `got` against the float64 `gold` (None when it passes the bound above)."""
    if got.shape != gold.shape or got.dtype != gold.dtype:
        return f"got {got.dtype} {tuple(got.shape)}, expected {gold.dtype} {tuple(gold.shape)}"
    a, e, r = (t.detach().cpu().to(torch.float64) for t in (got, gold, ref32))
    rtol, atol = testing.TOLERANCE[got.dtype]
    bound = 0.0
    if got.dtype == torch.float32 and e.numel():
        bound = BOUND_FACTOR * float(torch.where(e.isnan() & r.isnan(), 0.0, (r - e).abs()).nan_to_num(0).max())
    err = (a - e).abs()
    bad = (a.isnan() != e.isnan()) | (~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True) & (err > bound))
    if not bool(bad.any()):
        return None
    return f"{testing.first_differences(bad, a, e)} (rtol={rtol}, atol={atol}, float32 bound={bound:g})"


def assert_scan_close(got: torch.Tensor, gold: torch.Tensor, ref32: torch.Tensor, what: str) -> None:
    """`got` within the scan bound of the float64 `gold` (scan_problem), else the test fails naming `what`."""
    problem = scan_problem(got, gold, ref32)
    if problem:
        pytest.fail(f"{what}: {problem}", pytrace=False)


def run_and_check(args: tuple, entry=None, what: str = "") -> tuple:
    """Call the op (`entry`, default the public function) on `args` and compare delta, z and ssm_states with the
    float64 reference; returns (gold, the float32 reference's results)."""
    gold = OP.reference(*args, compute_dtype=torch.float64)
    ref32 = OP.reference(*args)
    (entry or OP.public)(*args)
    synchronize(args[0].device)
    for name, k in OUTPUTS:
        got = args[ARG[name]]
        if got is not None:
            assert_scan_close(got, gold[k], ref32[k], f"selective_scan_fwd{' ' + what if what else ''}: {name}")
    return gold, ref32


# ---- guarded outputs ---------------------------------------------------------------------------------------------


def guarded(t: torch.Tensor, before: int = 3, after: int = GUARD) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): a contiguous copy of `t` `before` elements into a NaN-filled buffer with `after` spare
    elements after it. A write outside the view lands in the buffer (assert_untouched sees it); a read there
    gives NaN, which the reference comparison sees."""
    buffer = torch.full((before + t.numel() + after,), float("nan"), dtype=t.dtype, device=t.device)
    view = buffer[before:before + t.numel()].view(t.shape)
    view.copy_(t)
    return view, buffer


def run_guarded(args: tuple, entry=None, what: str = "", *, spare_slots: int = 0) -> tuple:
    """run_and_check on copies of delta, z and ssm_states in guarded buffers (ssm_states with `spare_slots`
    whole slots of NaN on each side, where a slot index just outside ssm_states lands), then every element
    around them checked unchanged. Returns (the arguments as called, clones of them from before the call,
    the float64 reference's results)."""
    args = list(args)
    buffers = {}
    for name in ("delta", "z_", "ssm_states"):
        t = args[ARG[name]]
        if t is not None:
            spare = spare_slots * t[0].numel() if name == "ssm_states" else 0
            args[ARG[name]], buffers[name] = guarded(t, 3 + spare, GUARD + spare)
    args = tuple(args)
    before = clone_args(args)
    snapshot = {name: buffer.clone() for name, buffer in buffers.items()}
    gold, _ = run_and_check(args, entry, what)
    for name, buffer in buffers.items():
        assert_untouched(args[ARG[name]], buffer, snapshot[name], f"selective_scan_fwd {what}: around {name}")
    return args, before, gold


# ---- cache slots outside ssm_states (the docstring's point 5; the spec's hazard 5) ------------------------------

SPARE_SLOTS = 4  # guard slots on each side of ssm_states: bad_slots_call's slots -2 .. num_slots + 3 land there


def bad_slots_call(device, dtype, mode: str, null: int, seed: int) -> tuple[tuple, list]:
    """(args, the sequences that must start from zero): a call whose sequences all ask for their initial state,
    with slots outside ssm_states that are not null_block_id. Plain mode ("short": batched, L = 3; "varlen"):
    cache_indices [num_slots + 3, the negative id that is not null (-1 when null = 0, else -2), a valid slot].
    "cache" (prefix-cache, varlen, cu_chunk_seqlen): row 0 all num_slots + 3, row 1 all that negative id; rows 2
    and 3 valid slots every other column with num_slots + 3 between, and columns outside the row: row 2
    initial_state_idx just past it, block_idx_last_scheduled_token -1 and block_idx_first_scheduled_token 2
    blocks before its end (its later chunks' states belong past the row), row 3 initial_state_idx -1 and
    block_idx_last_scheduled_token just past the row (no initial state, no final store; the intermediate stores
    in valid columns still made); row 4 untouched. cache_indices is a view of
    a buffer one column wider, whose hidden column holds slots no row uses: a column read past a row gets a valid
    slot there (a state read or written), not the next row's."""
    negative = -1 if null == 0 else -2
    if mode == "cache":
        args = random_call(device, dtype, d=20, n=4, lengths=[40, 9, 70, 33, 20], cache=True, cu_chunks=True,
                           block_size=16, null=null, a_scale=0.05, seed=seed)
        ci, bif, bil, isi = (args[ARG[n]].clone() for n in ("cache_indices", "block_idx_first_scheduled_token",
                                                             "block_idx_last_scheduled_token", "initial_state_idx"))
        slots, (b, width) = args[ARG["ssm_states"]].shape[0], ci.shape
        wide = torch.cat([ci, torch.cat([ci[0], ci[1]])[:b, None]], 1)  # rows 0 and 1's slots, unused below
        ci = wide[:, :width]
        ci[0], ci[1], ci[2:4, 1::2] = slots + 3, negative, slots + 3
        isi[2], bil[2], bif[2], isi[3], bil[3] = width, -1, width - 2, -1, width
        args = with_args(args, cache_indices=ci, block_idx_first_scheduled_token=bif,
                         block_idx_last_scheduled_token=bil, initial_state_idx=isi)
        bad = [0, 1, 2, 3]
    else:
        kw = dict(b=3, L=3) if mode == "short" else dict(lengths=[40, 9, 70])
        args = random_call(device, dtype, d=20, n=4, null=null, a_scale=0.05, seed=seed, **kw)
        ci = args[ARG["cache_indices"]].clone()
        ci[0], ci[1] = args[ARG["ssm_states"]].shape[0] + 3, negative
        args = with_args(args, cache_indices=ci)
        bad = [0, 1]
    his = torch.ones_like(args[ARG["has_initial_state"]])
    return with_args(args, has_initial_state=his), bad


def check_bad_slots(args: tuple, bad: list, entry=None, what: str = "") -> None:
    """bad_slots_call's call against the float64 reference with ssm_states between SPARE_SLOTS NaN slots on each
    side: a read of a bad slot gives NaN outputs, a write changes a guard. And the reference pins the zero start:
    its results equal those of the same call with has_initial_state off for the `bad` sequences."""
    his = args[ARG["has_initial_state"]].clone()
    his[bad] = False
    zero_start = OP.reference(*with_args(args, has_initial_state=his), compute_dtype=torch.float64)
    _, _, gold = run_guarded(args, entry, what, spare_slots=SPARE_SLOTS)
    for name, k in OUTPUTS:
        if gold[k] is not None:
            assert_bitwise_equal(gold[k], zero_start[k], f"reference {name} with bad slots vs zero initial states")


# ---- varlen tokens outside [query_start_loc[0], query_start_loc[b]) -----------------------------------------------


def padded_varlen_call(device, dtype, lengths: list, start: int, total: int, seed: int) -> tuple:
    """random_call's varlen call with its tokens moved to [start, start + sum(lengths)) of a T = total token axis
    (query_start_loc[0] = start, query_start_loc[b] < T: a CUDA-graph-padded batch). Outside them u, B and C hold
    NaN (a token read into a sequence's math shows) and delta and z SENTINEL (a y written there shows)."""
    args = list(random_call(device, dtype, d=20, n=4, lengths=lengths, pad=1 if len(lengths) > 2 else None,
                            a_scale=0.05, seed=seed))
    end = start + sum(lengths)
    for name in ("u", "delta", "z_", "B", "C"):
        t = args[ARG[name]]
        wide = torch.full((*t.shape[:-1], total), SENTINEL if name in ("delta", "z_") else float("nan"),
                          dtype=t.dtype, device=t.device)
        wide[..., start:end] = t
        args[ARG[name]] = wide
    args[ARG["query_start_loc"]] = args[ARG["query_start_loc"]] + start
    return tuple(args)


def check_padded_tokens(args: tuple, entry=None, what: str = "") -> None:
    """padded_varlen_call's call against the float64 reference (guarded), and delta and z bitwise unchanged at
    every token outside [query_start_loc[0], query_start_loc[b])."""
    args, before, _ = run_guarded(args, entry, what)
    qsl = args[ARG["query_start_loc"]]
    first, last = int(qsl[0]), int(qsl[-1])
    for name in ("delta", "z_"):
        for outside in (slice(0, first), slice(last, None)):
            assert_bitwise_equal(args[ARG[name]][:, outside], before[ARG[name]][:, outside],
                                 f"selective_scan_fwd {what}: {name} at tokens [{outside.start}, {outside.stop})")


# ---- the softplus threshold ------------------------------------------------------------------------------------


def large_bias_call(device, dtype, seed: int, **kw) -> tuple:
    """random_call with softplus on and delta_bias 100 on the even channels (dt = delta + 100 > 20 is kept as
    is, as vLLM and mamba do; log1p(exp(dt)) would overflow float32 to inf past dt = 88.7) and 20 on every
    fourth odd one (dt straddles the threshold)."""
    args = random_call(device, dtype, softplus=True, bias=True, seed=seed, **kw)
    bias = args[ARG["delta_bias_"]].clone()
    bias[0::2], bias[1::4] = 100.0, 20.0
    return with_args(args, delta_bias_=bias)


# ---- strided metadata and parameters -------------------------------------------------------------------------

# What the elements between a strided metadata tensor's hold: values that change the call if read (a bad slot or
# column, padding with null_block_id = -1), yet keep every access in bounds (query_start_loc: 0, within T).
SPREAD_FILL = {"query_start_loc": 0}


def spread(t: torch.Tensor, fill) -> torch.Tensor:
    """`t` as x[::2] (every dim) of a buffer twice its size; the elements between hold `fill` (bool tensors: the
    negation of the element before)."""
    buffer = torch.empty(tuple(2 * s for s in t.shape), dtype=t.dtype, device=t.device)
    if t.dtype == torch.bool:
        buffer.copy_((~t).repeat_interleave(2, 0))
    else:
        buffer.fill_(fill)
    view = buffer[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


def strided_metadata_call(args: tuple) -> tuple[tuple, torch.Tensor]:
    """(args, ssm_states' buffer): every metadata tensor given as x[::2] of a doubled buffer (cache_indices
    [::2, ::2]: both strides 2), A as a transposed-contiguous view (strides (1, d)), D and delta_bias every other
    element of a NaN buffer, ssm_states every other element of the last dim of a NaN buffer [slots, d, 2n]
    (strides (2dn, 2n, 2): the op accepts any state strides)."""
    changes = {}
    for name in ("query_start_loc", "cache_indices", "has_initial_state", "block_idx_first_scheduled_token",
                 "block_idx_last_scheduled_token", "initial_state_idx", "cu_chunk_seqlen", "last_chunk_indices"):
        if args[ARG[name]] is not None:
            changes[name] = spread(args[ARG[name]], SPREAD_FILL.get(name, -1))
    for name in ("D_", "delta_bias_"):
        if args[ARG[name]] is not None:
            changes[name] = spread(args[ARG[name]], float("nan"))
    A = args[ARG["A"]]
    changes["A"] = A.t().contiguous().t()
    st = args[ARG["ssm_states"]]
    buffer = torch.full((*st.shape[:-1], 2 * st.shape[-1]), float("nan"), dtype=st.dtype, device=st.device)
    changes["ssm_states"] = buffer[..., ::2]
    changes["ssm_states"].copy_(st)
    return with_args(args, **changes), buffer


def check_strided_metadata(args: tuple, entry=None, what: str = "") -> None:
    """strided_metadata_call's call against the float64 reference, and ssm_states' buffer untouched between its
    elements."""
    args, buffer = strided_metadata_call(args)
    snapshot = buffer.clone()
    run_and_check(args, entry, what)
    assert_untouched(args[ARG["ssm_states"]], buffer, snapshot, f"selective_scan_fwd {what}: between ssm_states")
