"""selective_scan_fwd on the GPU only: vLLM's kernel on the same inputs, padding and guard elements provably
untouched, long and wide calls (both plan paths, > 65535 tokens), CUDA graphs, CuPy arrays, a non-current device;
and, on the CPU, the plan's choices (paths, grids, shared memory, scratch) for an H200's 132 SMs.
Tests with "long" in their name take seconds (their float64 reference loops over thousands of tokens): leave them
out of compute-sanitizer runs with -k "not long"."""

from __future__ import annotations

import pytest
import torch
from helpers import bits, gpu, requires_cuda, requires_two_gpus, synchronize
from selective_scan_utils import ARG, OUTPUTS, clone_args, run_and_check, run_guarded, scan_problem, with_args

import cupy_ops
from cupy_ops._runtime import Launch, Scratch, launcher
from cupy_ops.ops import selective_scan_fwd as module
from cupy_ops.ops.selective_scan_fwd import OP
from cupy_ops.ops.selective_scan_ref import random_call

cuda = [gpu, requires_cuda]


# ---- vLLM's kernel on the same inputs ------------------------------------------------------------------------

VLLM_CASES = {  # cases where vLLM 0.33's semantics are the spec's (no hazard applies)
    "batched-bf16-L2048": dict(dtype=torch.bfloat16, b=2, d=64, n=16, L=2048),
    "batched-fp32-L130-g2": dict(dtype=torch.float32, b=3, d=32, n=16, g=2, L=130),
    "varlen-fp16-null-1": dict(dtype=torch.float16, d=32, n=16, lengths=[1, 256, 7, 1024], pad=2),
    "varlen-bf16-null0-fp32-states": dict(dtype=torch.bfloat16, d=32, n=16, lengths=[300, 5, 77], pad=1, null=0,
                                          state_dtype=torch.float32),
    "prefix-cache-cu-block64": dict(dtype=torch.float32, d=16, n=8, lengths=[200, 3, 90], cache=True,
                                    cu_chunks=True, block_size=64, pad=1),
    "prefix-cache-cu-block1024": dict(dtype=torch.bfloat16, d=16, n=8, b=2, L=1500, cache=True, cu_chunks=True,
                                      block_size=1024, state_dtype=torch.float32),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", list(VLLM_CASES))
def test_matches_vllm(case, vllm_ops):
    """Both kernels on copies of the same inputs: each within the scan bound of the float64 reference, and the
    two within twice it of each other."""
    kw = dict(VLLM_CASES[case])
    args = random_call("cuda", kw.pop("dtype"), seed=21, **kw)
    theirs = clone_args(args)
    vllm_ops.selective_scan_fwd(*theirs)
    gold, ref32 = run_and_check(clone_args(args), what=case)
    for name, k in OUTPUTS:
        if theirs[ARG[name]] is None:
            continue
        problem = scan_problem(theirs[ARG[name]], gold[k], ref32[k])
        assert problem is None, f"vLLM's {name} disagrees with the float64 reference (a test-case bug): {problem}"


# ---- untouched memory ----------------------------------------------------------------------------------------


# Guards the sequence starts: a NaN or inf state of one varlen sequence must not reach the next (0 * NaN = NaN).
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("lengths, value", [([5, 150], "nan"), ([16, 150], "nan"), ([16, 150], "inf"),
                                            ([100, 150], "nan")],
                         ids=["general-window", "light-window", "light-window-inf", "chunk-carry"])
def test_nan_stays_in_its_sequence(lengths, value):
    """fp32 lanes hold 8 tokens: the second sequence starts in lane 0 beside the first (two starts: kGeneral), or
    at lane 2's first token (kLight), or (64-token chunks) at lane 4 of chunk 1, whose carried-in state is already
    NaN. u is `value` at token 3 of the first sequence."""
    args = random_call("cuda", torch.float32, d=8, n=4, lengths=lengths, seed=11)
    args[ARG["u"]][:, 3] = float(value)
    run_and_check(args)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ["batched", "varlen", "cache", "short", "chunked-varlen"])
def test_padding_and_guards_untouched(mode):
    """The padding sequence's y and z, every slot no sequence owns (the null block and the spares) and the
    elements around every written buffer keep their bits."""
    kw = {"batched": dict(b=3, L=300), "varlen": dict(lengths=[40, 130, 1, 9]),
          "cache": dict(lengths=[40, 100, 9], cache=True, block_size=16, cu_chunks=True),
          "short": dict(b=4, L=5), "chunked-varlen": dict(lengths=[700, 900, 600])}[mode]
    args = random_call("cuda", torch.bfloat16, d=24, n=8, pad=1, null=0, seed=22, **kw)
    args, before, _ = run_guarded(args, what=mode)  # the guard elements around delta, z and ssm_states
    delta, z, states = (before[ARG[name]] for name in ("delta", "z_", "ssm_states"))
    qsl = args[ARG["query_start_loc"]]
    pad = (slice(None), slice(int(qsl[1]), int(qsl[2]))) if qsl is not None else (1,)
    assert torch.equal(bits(args[ARG["delta"]][pad]), bits(delta[pad])), "padding sequence's y was written"
    assert torch.equal(bits(args[ARG["z_"]][pad]), bits(z[pad])), "padding sequence's z was written"
    ci = args[ARG["cache_indices"]]
    owned = set(ci.flatten().tolist()) - {0}
    for slot in range(states.shape[0]):
        if slot not in owned:
            assert torch.equal(bits(args[ARG["ssm_states"]][slot]), bits(states[slot])), f"slot {slot} was written"


# ---- long and wide calls -------------------------------------------------------------------------------------

LONG_CASES = {
    "b8-d1536-n16-L2048-bf16-one-pass": dict(dtype=torch.bfloat16, b=8, d=1536, n=16, L=2048),
    "b1-d256-n256-L4100-fp32-chunked": dict(dtype=torch.float32, b=1, d=256, n=256, L=4100, a_scale=0.05),
    "b3-d16-n64-L2049-fp16-chunked": dict(dtype=torch.float16, b=3, d=16, n=64, L=2049, g=16),
    "varlen-d3200-one-pass": dict(dtype=torch.bfloat16, d=3200, n=16, lengths=[50, 1, 149, 130], pad=2),
    "varlen-T70000-chunked": dict(dtype=torch.float32, d=16, n=4, lengths=[1000, 68000, 1000], a_scale=0.01),
    "batched-L70000-chunked": dict(dtype=torch.bfloat16, b=1, d=8, n=4, L=70000, state_dtype=torch.float32),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case", list(LONG_CASES))
def test_long(case):
    """The spec's largest sizes, both plan paths (one pass over whole rows; rows cut into chunks), > 65535 tokens;
    small |A| (a_scale) keeps states alive across thousands of tokens, so chunk carries matter."""
    kw = dict(LONG_CASES[case])
    run_and_check(random_call("cuda", kw.pop("dtype"), seed=23, **kw), what=case)


# cu_chunk_seqlen chunks of 24 tokens in 64-token blocks (test_selective_scan_emulated.py has the why): several
# stores to one slot, made by different CUDA blocks of the chunked plan; the slot must hold the last one.
@pytest.mark.gpu
@requires_cuda
def test_prefix_cache_chunks_shorter_than_a_block():
    run_and_check(random_call("cuda", torch.float32, d=16, n=3, lengths=[300, 40, 250], block_size=64, cache=True,
                              cu_chunks=True, max_chunk=24, a_scale=0.02, seed=61), what="prefix-cache short chunks")


# ---- CUDA graphs, CuPy, another device -------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kw", [dict(lengths=[500, 7, 1300]), dict(b=2, L=1000), dict(b=6, L=3)],
                         ids=["varlen-chunked", "batched-chunked", "short"])
def test_cuda_graph_replays_with_new_data(kw):
    """Captured once (scratch buffer, three launches when chunked), replayed on new values copied in."""
    args = random_call("cuda", torch.float16, d=24, n=8, seed=24, **kw)
    OP.public(*clone_args(args))  # compile and plan outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        OP.public(*args)
    for seed in (25, 26):
        fresh = random_call("cuda", torch.float16, d=24, n=8, seed=seed, **kw)
        gold = OP.reference(*fresh, compute_dtype=torch.float64)
        ref32 = OP.reference(*fresh)
        for mine, new in zip(args, fresh):
            if isinstance(mine, torch.Tensor):
                mine.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        for name, k in OUTPUTS:
            assert scan_problem(args[ARG[name]], gold[k], ref32[k]) is None, (seed, name)


@pytest.mark.gpu
@requires_cuda
def test_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    args = random_call("cuda", torch.float16, d=24, n=8, lengths=[30, 200, 1], pad=0, seed=27)
    gold = OP.reference(*args, compute_dtype=torch.float64)
    ref32 = OP.reference(*args)
    arrays = tuple(cupy.from_dlpack(a) if isinstance(a, torch.Tensor) else a for a in args)
    OP.public(*arrays)
    cupy.cuda.get_current_stream().synchronize()
    for name, k in OUTPUTS:  # the arrays share memory with the torch tensors
        assert scan_problem(args[ARG[name]], gold[k], ref32[k]) is None, name


@pytest.mark.gpu
@requires_two_gpus
@pytest.mark.parametrize("kw", [dict(lengths=[300, 9, 2000]), dict(b=2, L=6)], ids=["chunked", "short"])
def test_on_the_second_gpu(kw):
    """Tensors on cuda:1 while cuda:0 is current: the launches (and the scratch buffer) go to cuda:1."""
    torch.cuda.set_device(0)
    run_and_check(random_call("cuda:1", torch.bfloat16, d=24, n=8, seed=28, **kw))
    assert torch.cuda.current_device() == 0


@pytest.mark.gpu
@requires_cuda
def test_dispatcher_and_eager_agree():
    args = random_call("cuda", torch.bfloat16, d=24, n=8, lengths=[33, 400], seed=29)
    mine, theirs = clone_args(args), clone_args(args)
    cupy_ops.selective_scan_fwd(*mine)
    torch.ops.cupy_ops.selective_scan_fwd(*theirs)
    synchronize("cuda")
    for name, _ in OUTPUTS:
        assert torch.equal(bits(mine[ARG[name]]), bits(theirs[ARG[name]])), name


# ---- the plan, on the CPU --------------------------------------------------------------------------------------

H200_SMS = 132


def _plan(args, monkeypatch) -> list:
    monkeypatch.setattr(launcher, "device_attribute", lambda device, name: H200_SMS)
    call, _ = OP.validate(args)  # CPU tensors: validation and planning only (strides, alignment as given)
    return module.plan(call)


@pytest.mark.parametrize("kw, kernels, chunks", [
    (dict(b=8, d=4096, L=4), ["short"], None),                   # decode: states on lanes
    (dict(b=1, d=4096, L=2048), ["chunk"], 1),                   # 1024 warps >= 6 per SM: whole rows
    (dict(b=1, d=256, L=8192), ["scratch", "pass1", "carry", "chunk"], 13),  # 64 warps: 792 / 64 -> 13 chunks
    (dict(b=2, d=64, L=300), ["scratch", "pass1", "carry", "chunk"], 3),
    (dict(lengths=[100] * 64, d=4096), ["chunk"], 1),            # varlen, wide: one chunk of all tokens
    (dict(lengths=[16384], d=512), ["scratch", "pass1", "carry", "chunk"], 7),
], ids=["short", "one-pass", "chunked-long", "chunked-short", "varlen-one-pass", "varlen-chunked"])
def test_plan_paths(kw, kernels, chunks, monkeypatch):
    steps = _plan(random_call("cpu", torch.bfloat16, n=16, seed=30, **kw), monkeypatch)
    names = []
    for step in steps:
        if isinstance(step, Scratch):
            if step.nbytes:  # 0 bytes: no buffer, a null pointer
                names.append("scratch")
            continue
        expr = step.kernel.name_expression
        names.append("short" if "short" in expr else "carry" if "carry" in expr else
                     "pass1" if ", true," in expr else "chunk")
    assert names == kernels
    scan = [s for s in steps if isinstance(s, Launch) and "chunk_kernel" in s.kernel.name_expression]
    if chunks is not None:
        assert scan[-1].config.grid[0] == chunks * (kw.get("b") or 1)
        assert scan[-1].values["chunk_tokens"] % 128 == 0
        # carry in and out and A log2 e: 3 x [16 channels][n = 16] floats; B and C of 16 states x 128 tokens as
        # float when every block's 16 channels share a group (d / g a multiple of 16); 4 warps' event tables
        staged = scan[-1].values["group_size"] % 16 == 0
        assert scan[-1].values["stage_bc"] == staged
        assert scan[-1].config.shared_bytes == 3 * 16 * 16 * 4 + staged * 2 * 16 * 128 * 4 + 4 * (2 * 128 * 4 + 128)
    if "scratch" in names:
        d, total = scan[-1].values["dim"], scan[-1].values["num_chunks"]
        assert steps[0].nbytes == 4 * total * (2 * d * 16 + d + 1)
    else:
        assert all(s.nbytes == 0 for s in steps if isinstance(s, Scratch))


def test_plan_vectors_need_aligned_rows(monkeypatch):
    args = random_call("cpu", torch.bfloat16, b=2, d=32, n=16, L=256, seed=31)
    assert _plan(args, monkeypatch)[-1].values["vec_ok"]
    u = args[ARG["u"]]
    wide = torch.zeros(2, 32, 260, dtype=u.dtype)[..., 1:257]  # rows 1 element off 16 bytes
    assert not _plan(with_args(args, u=wide), monkeypatch)[-1].values["vec_ok"]
