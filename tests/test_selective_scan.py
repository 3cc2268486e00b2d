"""selective_scan_fwd on the CPU kernel (the float32 reference) and the CUDA kernel against the float64 reference:
the spec's matrix (batched and varlen, lengths, channels, states, groups, options, initial states, padding, state
dtype, prefix-cache mode, strides), the reference against independent formulations, validation, opcheck,
torch.compile and the functional `selective_scan_fn`. GPU sizes stay small (compute-sanitizer runs these); the
few long ones have "long" in their name.

How the matrix was cut (the full product is ~10^5 cases): each axis is swept with the others at small values, and
the plan's paths are each hit: b x ceil(d / 16) < 198 channel blocks cuts rows into chunks on an H200
(pass 1 + carry + pass 2), larger calls scan whole rows in one pass, L <= 8 takes the short kernel."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, compiled_matches_eager, gpu, opcheck, requires_cuda
from selective_scan_utils import (ARG, assert_scan_close, bad_slots_call, check_bad_slots, check_padded_tokens,
                                  check_strided_metadata, clone_args, large_bias_call, padded_varlen_call,
                                  run_and_check, with_args)

import cupy_ops
from cupy_ops._runtime import launcher
from cupy_ops.ops.selective_scan_fwd import OP, selective_scan_fn
from cupy_ops.ops.selective_scan_ref import random_call, selective_scan_fwd_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def call(device, dtype=torch.bfloat16, **kw) -> tuple:
    return random_call(device, dtype, **kw)


# ---- the spec's matrix ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [1, 7, 8, 9, 128, 129, 300])
def test_batched_lengths(device, dtype, L):
    """b = 3, d = 24 (two channel blocks, the second partial), n = 16, with z, D, bias, softplus, mixed initial
    states, a padding sequence; L = 1..8 short kernel, the rest chunked (few channels)."""
    run_and_check(call(device, dtype, b=3, d=24, n=16, L=L, pad=1, seed=L))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [77, 256])  # 256: whole windows, so the final state is stored from the last carry
@pytest.mark.parametrize("b, d, n, g", [(1, 1, 1, 1), (8, 16, 16, 2), (3, 256, 64, 256), (2, 16, 256, 16),
                                        (1, 40, 1, 4), (2, 6, 8, 2), (2, 24, 5, 3)])
def test_batched_shapes(device, b, d, n, g, L):
    """d = 1 and 6 leave lanes of a warp without a channel (they must not store, nor stall the others); odd n
    leaves fast windows a last state alone after their pairs (n = 1: only that one)."""
    run_and_check(call(device, torch.bfloat16, b=b, d=d, n=n, g=g, L=L, seed=d + n + L))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", ["none", "z", "D", "bias", "softplus"])
def test_options(device, options):
    """Each optional input alone (and none): D, z, delta_bias absent and softplus off are other code paths."""
    on = dict(z=options == "z", D=options == "D", bias=options == "bias", softplus=options == "softplus")
    run_and_check(call(device, torch.float16, b=2, d=20, n=8, L=150, seed=3, **on))
    run_and_check(call(device, torch.float16, d=20, n=8, lengths=[5, 150, 1], seed=4, **on))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["batched", "varlen", "short", "cache"])
def test_float32_states_with_16bit_inputs(device, dtype, mode):
    kw = dict(b=2, L=4 if mode == "short" else 140) if mode in ("batched", "short") else dict(lengths=[70, 3, 90])
    run_and_check(call(device, dtype, d=24, n=16, state_dtype=torch.float32, cache=mode == "cache",
                       block_size=32, seed=5, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[1, 7, 128, 129, 300], [1] * 20, [0, 5, 0], [64, 64, 64], [3, 2000]],
                         ids=["mixed", "decode", "empty", "window-aligned", "long-tail"])
def test_varlen(device, dtype, lengths):
    """Sequences starting anywhere in a window, one token each, empty ones (nothing written), window-aligned
    ones, and one crossing many chunks; sequence 1 is padding when there are 3 or more."""
    run_and_check(call(device, dtype, d=24, n=16, lengths=lengths, pad=1 if len(lengths) > 2 else None,
                       seed=len(lengths)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("null", [-1, 0])
@pytest.mark.parametrize("init", [0.0, 1.0])
def test_cache_indices_and_null_block(device, null, init):
    """vLLM's null_block_id 0 (slot 0 is the null block) and older callers' -1; no and all initial states."""
    run_and_check(call(device, torch.bfloat16, d=16, n=8, lengths=[9, 200, 1, 40], pad=2, null=null, init=init,
                       seed=7))
    run_and_check(call(device, torch.bfloat16, b=4, d=16, n=8, L=60, pad=0, null=null, init=init, seed=8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("null", [0, 2])
def test_null_block_id_is_unused_without_cache_indices(device, null):
    """No cache_indices: sequence s reads and writes slot s even when s == null_block_id (the padding rule needs
    cache_indices; vLLM's kernel tests cache_indices first): outputs and states bit-equal to null_block_id -1's,
    sequence `null`'s final state written, and both match the float64 reference."""
    args = call(device, torch.float32, b=3, d=16, n=8, L=40, init=1.0, cache_indices=False, seed=9)
    runs = [clone_args(with_args(args, null_block_id=n)) for n in (-1, null)]
    for run in runs:
        run_and_check(run, what=f"null_block_id {run[ARG['null_block_id']]}")
    for name in ("delta", "z_", "ssm_states"):
        assert torch.equal(runs[0][ARG[name]], runs[1][ARG[name]]), name
    assert not torch.equal(runs[1][ARG["ssm_states"]][null], args[ARG["ssm_states"]][null])  # its final state


@pytest.mark.parametrize("device", DEVICES)
def test_no_cache_indices(device):
    """Sequence s uses slot s; slots past b are untouched."""
    run_and_check(call(device, torch.float32, b=3, d=16, n=4, L=50, cache_indices=False, seed=9))
    run_and_check(call(device, torch.float32, d=16, n=4, lengths=[20, 1, 33], cache_indices=False, seed=10))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [16, 64, 2048, 4096])
@pytest.mark.parametrize("cu_chunks", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_prefix_cache_mode(device, block_size, cu_chunks, varlen):
    """Every intermediate block state (compared slot by slot: ssm_states is an output) for block sizes up to
    4096 (vLLM skips tokens past 2048), with vLLM's scheduler chunks or block_size chunks from
    block_idx_first_scheduled_token; sequence 1 is padding."""
    length = 2 * block_size + 37 if block_size <= 64 else 300
    kw = dict(lengths=[length, 5, 40]) if varlen else dict(b=3, L=length)
    run_and_check(call(device, torch.float32, d=16, n=8, cache=True, cu_chunks=cu_chunks, block_size=block_size,
                       pad=1, seed=block_size, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
def test_strided_rows(device, offset):
    """u, delta, z, B, C as views with padded channel, group and state strides (and, offset = 1, rows that are not
    16-byte aligned: the kernels' element-wise loads); ssm_states with a padded slot stride."""
    args = list(call(device, torch.bfloat16, b=2, d=24, n=8, g=2, L=133, seed=11))

    def padded(t):
        shape = list(t.shape)
        big = torch.zeros(*shape[:-1], shape[-1] + 8 + offset, dtype=t.dtype, device=t.device)
        big[..., offset:offset + shape[-1]] = t
        return big[..., offset:offset + shape[-1]]

    for name in ("u", "delta", "z_", "B", "C"):
        args[ARG[name]] = padded(args[ARG[name]])
    st = args[ARG["ssm_states"]]
    big = torch.zeros(st.shape[0], st.shape[1] + 3, st.shape[2], dtype=st.dtype, device=st.device)
    big[:, :st.shape[1]] = st
    args[ARG["ssm_states"]] = big[:, :st.shape[1]]
    run_and_check(tuple(args))


# ---- the docstring's promises: bad slots, padded varlen batches, the softplus threshold, strided metadata -------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("null", [-1, 0])
@pytest.mark.parametrize("mode", ["short", "varlen", "cache"])
def test_slots_outside_ssm_states(device, mode, null):
    """Slots past ssm_states and negative ones that are not null_block_id (vLLM indexes out of bounds: hazard 5)
    are neither read (zero initial state) nor written; in prefix-cache mode also initial_state_idx and
    block_idx_last_scheduled_token outside the row. ssm_states lies between NaN slots (bad_slots_call)."""
    args, bad = bad_slots_call(device, torch.bfloat16, mode, null, seed=32)
    check_bad_slots(args, bad, what=f"{mode} null={null}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, lengths, start, total", [
    (torch.bfloat16, [7, 9], 2, 20),          # one window: leading and trailing tokens beside the sequences
    (torch.float32, [70, 150, 40], 30, 300),  # chunked rows (few channels): whole chunks of trailing tokens
], ids=["one-window", "chunked"])
def test_varlen_tokens_outside_query_start_loc(device, dtype, lengths, start, total):
    """A CUDA-graph-padded varlen batch (query_start_loc[0] > 0, query_start_loc[b] < T): the tokens outside are
    left alone, and their NaN inputs reach no sequence."""
    check_padded_tokens(padded_varlen_call(device, dtype, lengths, start, total, seed=33))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, kw", [
    (torch.bfloat16, dict(b=2, d=24, n=8, L=150)),          # chunk kernel
    (torch.float32, dict(b=3, d=24, n=8, L=5)),             # short kernel (its own softplus call)
    (torch.float16, dict(d=24, n=8, lengths=[30, 1, 90])),  # varlen
], ids=["batched", "short", "varlen"])
def test_softplus_threshold(device, dtype, kw):
    """dt = delta + delta_bias past 20 is kept as is with delta_softplus (large_bias_call)."""
    run_and_check(large_bias_call(device, dtype, seed=34, **kw))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(lengths=[40, 50, 70, 9], cache=True, cu_chunks=True, block_size=16, pad=3),
                                dict(lengths=[40, 1, 0, 400], pad=1), dict(b=3, L=3, pad=1)],
                         ids=["prefix-cache", "varlen", "short"])
def test_strided_metadata_and_parameters(device, kw):
    """Every metadata tensor, A, D, delta_bias and ssm_states with strides the plan forwards (qsl, ci, his,
    block-index, cu/lci, A, D, delta_bias and state strides): strided_metadata_call."""
    check_strided_metadata(call(device, torch.bfloat16, d=20, n=4, a_scale=0.05, seed=35, **kw))


def test_query_start_loc_past_the_tokens_is_clamped_on_the_cpu():
    """query_start_loc past T breaks the caller's contract (wrong values, the docstring says, never an access
    outside the tensors): the CPU kernel clamps the sequences to [0, T) instead of raising IndexError, and a
    sequence inside T is computed as in a valid call."""
    args = random_call("cpu", torch.float32, d=4, n=2, lengths=[1, 3, 0, 2], seed=36)
    bad = with_args(clone_args(args), query_start_loc=torch.tensor([0, 1, 4, 4, 9], dtype=torch.int32))
    good = clone_args(args)
    cupy_ops.selective_scan_fwd(*bad)
    cupy_ops.selective_scan_fwd(*good)
    assert torch.equal(bad[ARG["delta"]][:, :1], good[ARG["delta"]][:, :1])


# ---- the reference against independent formulations -------------------------------------------------------------


def _closed_form(u, dt, A, B, C, D, h0):
    """y[c, t] = sum_k C[k, t] (exp(A S_t) h0 + sum_{s <= t} exp(A (S_t - S_s)) dt_s B[k, s] u_s) + D u_t with
    S_t = sum_{s <= t} dt_s: the scan as one sum (float64, one sequence, one group)."""
    S = dt.cumsum(-1)  # [d, L]
    decay = torch.exp(A[:, :, None, None] * (S[:, None, :, None] - S[:, None, None, :]))  # [d, n, t, s]
    decay = decay * torch.ones_like(decay).tril()
    x = (dt * u)[:, None, None, :] * B[None, :, None, :]  # [d, n, 1, s]
    h = (decay * x).sum(-1) + torch.exp(A[:, :, None] * S[:, None, :]) * h0[:, :, None]  # [d, n, t]
    return (h * C[None]).sum(1) + D[:, None] * u, h[:, :, -1]


def test_reference_matches_closed_form():
    u, delta, A, B, C, D, _, bias, _, _, ci, his, st, null, bs, *_ = call("cpu", torch.float64, b=1, d=6, n=5,
                                                                            L=40, z=False, init=1.0, seed=12)
    his = torch.ones_like(his)
    _, y, _, _, _, _, new_states = selective_scan_fwd_ref(u, delta, A, B, C, D, None, bias, True, None, ci, his,
                                                          st, null, bs, compute_dtype=torch.float64)
    dt = torch.nn.functional.softplus(delta[0] + bias[:, None])
    want_y, want_h = _closed_form(u[0], dt, A.double(), B[0, 0], C[0, 0], D.double(), st[ci[0]])
    torch.testing.assert_close(y[0], want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(new_states[ci[0]], want_h, rtol=1e-10, atol=1e-10)


def test_varlen_equals_batched_per_sequence():
    args = call("cpu", torch.float32, d=8, n=4, lengths=[5, 9, 1], init=1.0, seed=13)
    out = OP.reference(*args, compute_dtype=torch.float64)
    u, delta, A, B, C, D, z, bias, sp, qsl, ci, his, st, null, bs, *_ = args
    for s, (a, e) in enumerate(zip(qsl[:-1].tolist(), qsl[1:].tolist())):
        one = OP.reference(u[None, :, a:e], delta[None, :, a:e], A, B[None, ..., a:e], C[None, ..., a:e], D,
                           z[None, :, a:e], bias, sp, None, ci[s:s + 1], his[s:s + 1], st, null, bs,
                           compute_dtype=torch.float64)
        torch.testing.assert_close(out[1][:, a:e], one[1][0], rtol=0, atol=0)
        torch.testing.assert_close(out[6][ci[s]], one[6][ci[s]], rtol=0, atol=0)


def test_prefix_cache_states_equal_plain_prefixes():
    """Each stored block state is the plain-mode final state of the sequence's tokens up to that block's end."""
    args = call("cpu", torch.float64, b=1, d=6, n=4, L=45, cache=True, cu_chunks=True, block_size=8, init=0.0,
                seed=14)
    u, delta, A, B, C, D, _, bias, sp, _, ci, his, st, _, bs, bif, _, _, cu, lci = args
    his = torch.zeros_like(his)
    out = OP.reference(*with_args(args, has_initial_state=his), compute_dtype=torch.float64)
    done = int(bif[0]) * bs + (bs - int(cu[1] - cu[0]) if int(cu[1] - cu[0]) < bs else 0)
    for j in range(int(lci[0])):  # every chunk but the last
        end = int(cu[j + 1])
        plain = OP.reference(u[..., :end], delta[..., :end], A, B[..., :end], C[..., :end], D, None, bias, sp,
                             None, torch.zeros(1, dtype=torch.int32), None, st[:1].clone(), -1, 0,
                             compute_dtype=torch.float64)[6][0]
        slot = int(ci[0, (done + end - 1) // bs])
        torch.testing.assert_close(out[6][slot], plain, rtol=0, atol=0)


# ---- registration, compile, functional ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["batched", "varlen", "cache"])
def test_opcheck(device, mode):
    kw = dict(b=2, L=20) if mode == "batched" else dict(lengths=[3, 17])
    opcheck(OP, call(device, torch.float32, d=16, n=4, cache=mode == "cache", block_size=8, seed=15, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    compiled_matches_eager(OP, lambda: call(device, torch.bfloat16, d=16, n=4, lengths=[3, 30], seed=16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("varlen", [False, True])
def test_selective_scan_fn(device, varlen):
    """mamba_ssm's functional form: new tensors, inputs untouched, B and C as views of one projection, ungrouped
    [b, n, L] B and C, the last state."""
    g = torch.Generator(device="cpu").manual_seed(17)
    d, n, L = 16, 4, 50
    shape = (d, L) if varlen else (2, d, L)
    u, delta, z = (torch.randn(*shape, generator=g).to(device) for _ in range(3))
    A = -torch.rand(d, n, generator=g).to(device) - 0.5
    bc = torch.randn(*shape[:-2], 2 * n, L, generator=g).to(device)  # one projection, B and C views of it
    B, C = bc[..., :n, :], bc[..., n:, :]
    D = torch.randn(d, generator=g).to(device)
    h0 = torch.randn(1 if varlen else 2, d, n, generator=g).to(device)
    qsl = torch.tensor([0, L], dtype=torch.int32, device=device) if varlen else None
    before = [t.clone() for t in (u, delta, z, bc)]
    out, last = selective_scan_fn(u, delta, A, B, C, D, z, None, True, True, query_start_loc=qsl, initial_state=h0)
    for t, b in zip((u, delta, z, bc), before):
        assert torch.equal(t, b)
    Bg, Cg = B.unsqueeze(-3), C.unsqueeze(-3)
    ones = torch.ones(h0.shape[0], dtype=torch.bool, device=device)
    states = h0.clone()
    slots = torch.arange(h0.shape[0], dtype=torch.int32, device=device)
    ref_args = (u, delta, A, Bg.contiguous(), Cg.contiguous(), D, z, None, True, qsl, slots, ones, states, -1, 0)
    gold, ref32 = (selective_scan_fwd_ref(*ref_args, compute_dtype=cd) for cd in (torch.float64, torch.float32))
    assert_scan_close(out, gold[5], ref32[5], "selective_scan_fn: out = y silu(z)")
    assert_scan_close(last, gold[6], ref32[6], "selective_scan_fn: last state")
    # The defaults (no z, no delta_bias, no last state), by keyword: out is y itself.
    y = selective_scan_fn(u, delta, A, B, C, D, delta_softplus=True, query_start_loc=qsl, initial_state=h0)
    assert_scan_close(y, gold[1], ref32[1], "selective_scan_fn without z: out = y")
    # u, B and C whose last dimension is not of unit stride (columns of a transposed buffer) are copied first.
    u_t, bc_t = u.mT.contiguous().mT, bc.mT.contiguous().mT
    y_t = selective_scan_fn(u_t, delta, A, bc_t[..., :n, :], bc_t[..., n:, :], D, delta_softplus=True,
                            query_start_loc=qsl, initial_state=h0)
    assert torch.equal(y_t, y)


@pytest.mark.parametrize("device", DEVICES)
def test_selective_scan_fn_under_torch_compile(device):
    """selective_scan_fn in a fullgraph torch.compile (no graph break) gives an eager call's bits, with B and C
    views of one projection and with one tensor as both (eager copies a later input that shares memory with an
    earlier one; a compiled graph's functionalized op gets copies of what it writes)."""
    g = torch.Generator(device="cpu").manual_seed(23)
    u, delta = (torch.randn(2, 16, 40, generator=g).to(device) for _ in range(2))
    A = -torch.rand(16, 4, generator=g).to(device) - 0.5
    bc = torch.randn(2, 8, 40, generator=g).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *args: selective_scan_fn(*args, return_last_state=True), fullgraph=True)
    for B, C in ((bc[:, :4], bc[:, 4:]), (bc[:, :4], bc[:, :4])):
        for got, want in zip(compiled(u, delta, A, B, C), selective_scan_fn(u, delta, A, B, C, return_last_state=True)):
            assert torch.equal(got, want)


# ---- validation ----------------------------------------------------------------------------------------------


def _limit_cases(args: tuple) -> list:
    """Calls past the launch's limits, as meta tensors (validation only: no memory holds them): 2^31 tokens, 2^31
    sequences, and d = 65535 x 16 + 1 channels (65536 blocks of 16 channels on grid.y)."""
    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    L, b, d = 1 << 31, 1 << 31, 65535 * 16 + 1
    return [
        (dict(u=meta(2, 16, L), delta=meta(2, 16, L), z_=meta(2, 16, L), B=meta(2, 1, 4, L), C=meta(2, 1, 4, L)),
         ValueError, "u", r"has 2147483648 tokens a sequence; at most 2\^31 - 1"),
        (dict(query_start_loc=meta(b + 1, dtype=torch.int32), u=meta(16, 10), delta=meta(16, 10), z_=meta(16, 10),
              B=meta(1, 4, 10), C=meta(1, 4, 10), cache_indices=None, has_initial_state=None,
              ssm_states=meta(b, 16, 4)),
         ValueError, "query_start_loc", r"gives 2147483648 sequences; at most 2\^31 - 1"),
        (dict(A=meta(d, 4, dtype=torch.float32), u=meta(2, d, 10), delta=meta(2, d, 10), z_=meta(2, d, 10),
              D_=meta(d, dtype=torch.float32), delta_bias_=meta(d, dtype=torch.float32), ssm_states=meta(6, d, 4)),
         ValueError, "A", rf"has d = {d} channels; at most {65535 * 16}"),
    ]


def test_ssm_states_dtype_message_names_each_dtype_once():
    args = call("cpu", torch.float32, b=2, d=16, n=4, L=10, seed=18)
    st = args[ARG["ssm_states"]]
    with pytest.raises(TypeError, match=r"^selective_scan_fwd: ssm_states must be float32, got float16$"):
        OP.public(*with_args(args, ssm_states=st.to(torch.float16)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=(gpu, requires_cuda)), "meta"])
def test_rejects_before_any_launch(device):
    dev = "cpu" if device == "meta" else device
    args = call(dev, torch.bfloat16, b=2, d=16, n=4, L=10, seed=18)
    if device == "meta":
        args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    snapshot = clone_args(args)
    where = args[0].device

    def i32(*values):
        return torch.tensor(values, dtype=torch.int32, device=where)

    A, B, C, st = (args[ARG[n]] for n in ("A", "B", "C", "ssm_states"))
    # Prefix-cache mode on these batched tensors: rows of 2 slots, one block of 16 tokens each
    cache = dict(block_idx_first_scheduled_token=i32(0, 0), block_idx_last_scheduled_token=i32(0, 0),
                 initial_state_idx=i32(0, 0), cache_indices=i32(0, 1, 2, 3).view(2, 2), block_size=16)
    cases = [
        (dict(A=A[:, :3]), ValueError, "B", r"must be \[b, g, n, L\] with n = 3"),
        (dict(A=torch.zeros(16, 257, device=where)), ValueError, "A", r"at most 256"),
        (dict(B=B.expand(2, 3, 4, 10), C=C.expand(2, 3, 4, 10)), ValueError, "B",
         r"has 3 groups, which must divide d = 16"),
        (dict(C=C.expand(2, 2, 4, 10)), ValueError, "C", r"must have B's shape"),
        (dict(delta=args[ARG["delta"]][:, :, :9]), ValueError, "delta", r"must have u's shape"),
        (dict(z_=args[ARG["z_"]][:, :8]), ValueError, "z_", r"must have u's shape"),
        (dict(ssm_states=st[0]), ValueError, "ssm_states", r"must be \[slots, d, n\]"),
        (dict(ssm_states=st.to(torch.float16)), TypeError, "ssm_states", r"must be u's dtype"),
        (dict(cache_indices=args[ARG["cache_indices"]].long()), TypeError, "cache_indices", r"must be int32"),
        (dict(has_initial_state=args[ARG["has_initial_state"]].int()), TypeError, "has_initial_state",
         r"must be bool"),
        (dict(has_initial_state=args[ARG["has_initial_state"]][:1]), ValueError, "has_initial_state",
         r"must be \[b\]"),
        (dict(A=A.double()), TypeError, "A", r"must be float32"),
        (dict(cache_indices=None, ssm_states=st[:1]), ValueError, "ssm_states", r"needs b = 2"),
        (dict(u=args[ARG["u"]].transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "u",
         r"must have a contiguous last dimension"),
        # cache_indices by mode: [b] in plain mode, [b, max_blocks] in prefix-cache mode
        (dict(cache_indices=i32(0, 1).view(2, 1)), ValueError, "cache_indices", r"must be \[b\] = \[2\] \(plain"),
        (dict(cache, cache_indices=i32(0, 1)), ValueError, "cache_indices", r"must be \[b, max_blocks\]"),
        (dict(cache, cache_indices=i32(0, 1, 2).view(3, 1)), ValueError, "cache_indices",
         r"must be \[b, max_blocks\] = \[2, max_blocks\]"),
        # prefix-cache mode's required tensors (hazard 4) and its scalars and chunk tensors
        (dict(block_idx_first_scheduled_token=i32(0, 0)), ValueError, "block_idx_last_scheduled_token",
         r"is required in prefix-cache mode"),
        (dict(cache, cache_indices=None), ValueError, "cache_indices", r"is required in prefix-cache mode"),
        (dict(cache, initial_state_idx=None), ValueError, "initial_state_idx", r"is required in prefix-cache mode"),
        (dict(cache, block_size=0), ValueError, "block_size", r"must be >= 1 in prefix-cache mode, got 0"),
        (dict(cache, block_size=2**63), ValueError, "block_size", r"= 9223372036854775808; at most 2\^31 - 1"),
        (dict(null_block_id=2**31), ValueError, "null_block_id", r"= 2147483648 must fit int32"),
        (dict(null_block_id=-2**31 - 1), ValueError, "null_block_id", r"= -2147483649 must fit int32"),
        # its stride is read in plain mode too
        (dict(cu_chunk_seqlen=i32(0)[0]), ValueError, "cu_chunk_seqlen", r"must be 1-D \[chunks \+ 1\], got shape \(\)"),
        (dict(cache, cu_chunk_seqlen=i32(0, 10, 20)), ValueError, "cu_chunk_seqlen",
         r"and last_chunk_indices must be given together"),
        (dict(cache, last_chunk_indices=i32(0, 1)), ValueError, "cu_chunk_seqlen",
         r"and last_chunk_indices must be given together"),
        (dict(cache, cu_chunk_seqlen=i32(0, 10, 20).view(1, 3), last_chunk_indices=i32(0, 1)), ValueError,
         "cu_chunk_seqlen", r"must be 1-D \[chunks \+ 1\]"),
        # varlen layouts
        (dict(query_start_loc=i32(0, 5, 10).view(1, 3)), ValueError, "query_start_loc", r"must be 1-D \[b \+ 1\]"),
        (dict(query_start_loc=i32()), ValueError, "query_start_loc", r"must be 1-D \[b \+ 1\], got shape"),
        (dict(query_start_loc=i32(0, 5, 10)), ValueError, "u", r"must be \[d, T\] = \[16, T\] with query_start_loc"),
    ]
    if device == "meta":
        cases += _limit_cases(args)
    for change, error, arg, pattern in cases:
        with pytest.raises(error, match=rf"selective_scan_fwd: {arg} .*{pattern}"):
            cupy_ops.selective_scan_fwd(*with_args(args, **change))
    if device != "meta":
        for got, want in zip(args, snapshot):
            if isinstance(got, torch.Tensor):
                assert torch.equal(got, want), "an argument changed although the call was rejected"


def test_short_calls_past_the_one_dimensional_grid_use_the_chunk_kernel(monkeypatch):
    """b x ceil(d / 8) short-kernel blocks past 2^31 - 1 (grid.x's limit) go to the chunk kernel, whose grid is b x
    ceil(d / 16); meta tensors, planned for a 132-SM GPU."""
    monkeypatch.setattr(launcher, "device_attribute", lambda device, attr: {"sm_count": 132}[attr])

    def kernels(b):
        args = call("cpu", torch.bfloat16, b=1, d=64, n=4, L=4, seed=20)
        sizes = dict(u=(b, 64, 4), delta=(b, 64, 4), z_=(b, 64, 4), B=(b, 1, 4, 4), C=(b, 1, 4, 4),
                     ssm_states=(b, 64, 4), cache_indices=None, has_initial_state=None)
        meta = {name: None if size is None else torch.empty(size, dtype=args[ARG[name]].dtype, device="meta")
                for name, size in sizes.items()}
        c, _ = OP.validate(with_args(tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args),
                                     **meta))
        return [(step.kernel.name_expression, step.config.grid) for step in OP.plan(c) if hasattr(step, "kernel")]

    (short,) = kernels(1 << 20)
    assert "short" in short[0] and short[1] == ((1 << 20) * 8, 1, 1)
    (chunk,) = kernels(1 << 28)  # 2^31 short blocks
    assert "short" not in chunk[0] and chunk[1] == (1 << 28, 4, 1)


def test_rejects_an_output_overlapping_an_input():
    args = call("cpu", torch.float32, b=2, d=16, n=4, L=10, seed=19)
    with pytest.raises(ValueError, match="selective_scan_fwd: .*overlaps"):
        cupy_ops.selective_scan_fwd(*with_args(args, z_=args[ARG["delta"]]))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_calls_write_nothing(device):
    for kw in (dict(b=0, L=5), dict(b=2, L=0), dict(lengths=[0, 0])):
        args = call(device, torch.float32, d=16, n=4, seed=20, **kw)
        snapshot = clone_args(args)
        cupy_ops.selective_scan_fwd(*args)
        for got, want in zip(args, snapshot):
            if isinstance(got, torch.Tensor):
                assert torch.equal(got, want)
