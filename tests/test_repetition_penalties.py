"""apply_repetition_penalties_: the CPU kernel (the reference) and the CUDA kernel against the float64 reference
and, bit for bit, the float32 reference; special values; every mask alignment the plan distinguishes; strided
logits, masks and penalties; empty calls; validation; opcheck and torch.compile; on the GPU also vLLM's kernel,
CUDA graphs, CuPy arrays and a non-current device. GPU sizes stay small: these also run under compute-sanitizer."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEVICES,
    assert_bitwise_equal,
    assert_untouched,
    check_call,
    compiled_matches_eager,
    gpu,
    opcheck,
    requires_cuda,
    requires_two_gpus,
    strided,
    synchronize,
)
from penalties_utils import (
    DTYPES,
    LOGITS_LAYOUTS,
    MASK_LAYOUTS,
    assert_matches_fp32_reference,
    call_and_check,
    expected_fp32,
    penalty_args,
    special_value_args,
    with_mask_layout,
)

import cupy_ops
from cupy_ops._runtime import Call, TensorInfo
from cupy_ops.ops import apply_repetition_penalties_ as module
from cupy_ops.ops.apply_repetition_penalties_ import OP, mask_vector_bytes

# (num_seqs, vocab): one token; odd vocabs whose rows start at every offset mod 16; one multiple of 16;
# Qwen's 151936 (297 warp chunks of 512 tokens per row).
SHAPES = [(1, 1), (3, 17), (5, 1019), (13, 256), (4, 4099), (2, 151936)]


@pytest.fixture(params=["masked-reads", "speculative-reads"])
def logit_reads(request, monkeypatch):
    """Both kernels on the value tests: logits read only where a mask is set (large calls), or all of them with
    the masks (SPECULATE, calls of at most SPECULATE_MAX_BYTES); the CPU path ignores it."""
    monkeypatch.setattr(module, "SPECULATE_MAX_BYTES", 0 if request.param == "masked-reads" else 1 << 62)
    OP.forget_layouts()
    yield request.param
    OP.forget_layouts()


# ---- values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(device, dtype, shape, logit_reads):
    check_call(OP, penalty_args(device, dtype, *shape, seed=shape[1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("penalty_dtype", ["logits", "float32"])
@pytest.mark.parametrize("density", [0.01, 0.5, 1.0])
def test_bit_exact_against_float32_reference(device, dtype, penalty_dtype, density, logit_reads):
    """The spec's test: x > 0 ? x / p : x * p in float32, rounded once; vLLM's 1% and dense masks."""
    pd = torch.float32 if penalty_dtype == "float32" else dtype
    call_and_check(penalty_args(device, dtype, 37, 1019, density=density, penalty_dtype=pd, seed=7), "logits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("penalty_dtype", ["logits", "float32"])
def test_special_values(device, dtype, penalty_dtype, logit_reads):
    """penalties_utils.special_value_args: every special value under every kind of penalty and mask."""
    pd = torch.float32 if penalty_dtype == "float32" else dtype
    call_and_check(special_value_args(device, dtype, pd), "special values")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [17, 1019, 4099])
def test_one_tensor_as_both_masks(device, vocab):
    """Callers pass the same tensor as prompt_mask and output_mask (the kernel then reads it once)."""
    logits, prompt, _, penalties = penalty_args(device, torch.bfloat16, 6, vocab, seed=vocab)
    call_and_check((logits, prompt, prompt, penalties), "logits")


# ---- layouts -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", MASK_LAYOUTS)
@pytest.mark.parametrize("vocab", [1019, 4096])
def test_mask_layouts(device, layout, vocab, logit_reads):
    args = with_mask_layout(penalty_args(device, torch.float32, 7, vocab, density=0.2, seed=vocab), layout)
    call_and_check(args, f"logits with {layout} masks")


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_mask_and_penalty(device):
    """One mask row and one penalty broadcast to every row (stride 0): inputs may share elements."""
    logits, prompt, output, penalties = penalty_args(device, torch.float16, 9, 1019, seed=3)
    call_and_check((logits, prompt[:1].expand(9, 1019), output, penalties[:1].expand(9)), "logits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LOGITS_LAYOUTS)
def test_strided_logits_and_penalties(device, dtype, layout, logit_reads):
    """Only the view's elements change: every other element of the buffer keeps its bits. Penalties are every
    third element of theirs."""
    rows, vocab = 6, 1019
    source, prompt, output, penalties = penalty_args(device, dtype, rows, vocab, density=0.3, seed=11)
    strides, offset = LOGITS_LAYOUTS[layout]
    logits, buffer = strided((rows, vocab), strides, offset, dtype, device)
    buffer.copy_(torch.randn(buffer.shape, device=device).to(dtype))
    logits.copy_(source)
    spread, _ = strided((rows,), (3,), 1, penalties.dtype, device)
    spread.copy_(penalties)
    snapshot = buffer.clone()
    call_and_check((logits, prompt, output, spread), f"{layout} logits")
    assert_untouched(logits, buffer, snapshot, f"{layout} logits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 17), (4, 0), (0, 0)], ids=str)
def test_empty_calls_are_no_ops(device, shape):
    """num_seqs = 0 or vocab = 0 change nothing (vLLM divides by zero on the host at vocab = 0)."""
    call_and_check(penalty_args(device, torch.float32, *shape), "empty logits")


def test_meta_tensors_are_validated():
    logits, prompt, output, penalties = (t.to("meta") for t in penalty_args("cpu", torch.float16, 3, 17))
    with pytest.raises(TypeError, match="apply_repetition_penalties_: prompt_mask must be bool"):
        cupy_ops.apply_repetition_penalties_(logits, prompt.byte(), output, penalties)


def test_valid_meta_call_is_accepted():
    """Meta tensors: validation only (no memory, so no overlap to check)."""
    cupy_ops.apply_repetition_penalties_(*(t.to("meta") for t in penalty_args("cpu", torch.float16, 3, 17)))


def _info(dtype, shape, strides, align=None) -> TensorInfo:
    return TensorInfo(dtype, shape, strides, torch.empty(0, dtype=dtype).element_size(), align)


@pytest.mark.parametrize("prompt, output, rows, expected", [
    ((0, 1024), (0, 1024), 4, 16),
    ((3, 1019), (3, 1019), 4, 16),      # rows unaligned, but both masks alike
    ((8, 1024), (0, 1024), 4, 8),
    ((12, 1024), (0, 1024), 4, 4),
    ((0, 1019), (0, 1021), 4, 2),       # row strides 2 apart
    ((0, 1019), (0, 1020), 4, 1),
    ((0, 1019), (0, 1020), 1, 16),      # one row: its stride is never used
    ((5, 1024), (0, 1024), 1, 1),
])
def test_mask_vector_width(prompt, output, rows, expected):
    """The plan's choice, from (pointer mod 16, row stride) of each mask: the widest W in {16, 8, 4, 2, 1}
    dividing both differences."""
    vocab = 1019
    values = {"prompt_mask": _info(torch.bool, (rows, vocab), (prompt[1], 1), prompt[0]),
              "output_mask": _info(torch.bool, (rows, vocab), (output[1], 1), output[0])}
    assert mask_vector_bytes(Call(OP.name, values, {"num_seqs": rows, "vocab": vocab}, 0)) == expected


# ---- registration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(device, dtype):
    opcheck(OP, penalty_args(device, dtype, 3, 37))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_same_mask_twice(device):
    logits, prompt, _, penalties = penalty_args(device, torch.float32, 3, 37)
    opcheck(OP, (logits, prompt, prompt, penalties.float()))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    compiled_matches_eager(OP, lambda: penalty_args(device, torch.bfloat16, 5, 1019, seed=5))


# ---- validation ---------------------------------------------------------------------------------------------


def _every_other_column(t: torch.Tensor) -> torch.Tensor:
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    wide[:, ::2] = t
    return wide[:, ::2]


def _mask_inside_logits(a: list) -> None:
    a[0] = a[0].float()
    a[3] = a[3].float()
    a[1] = a[0].view(torch.bool)[:, :a[0].shape[1]]


# (id, exception, argument the message must name, change to the valid call [logits, prompt, output, penalties])
REJECTED = [
    ("logits-1d", ValueError, "logits", lambda a: a.__setitem__(0, a[0][0])),
    ("logits-int32", TypeError, "logits", lambda a: a.__setitem__(0, a[0].int())),
    ("logits-float64", TypeError, "logits", lambda a: a.__setitem__(0, a[0].double())),
    ("prompt-uint8", TypeError, "prompt_mask", lambda a: a.__setitem__(1, a[1].byte())),
    ("output-float", TypeError, "output_mask", lambda a: a.__setitem__(2, a[2].float())),
    ("prompt-fewer-rows", ValueError, "prompt_mask", lambda a: a.__setitem__(1, a[1][:-1])),
    ("output-wider", ValueError, "output_mask",
     lambda a: a.__setitem__(2, torch.zeros(a[2].shape[0], a[2].shape[1] + 1, dtype=torch.bool,
                                            device=a[2].device))),
    ("output-transposed-buffer", ValueError, "output_mask",
     lambda a: a.__setitem__(2, a[2].t().contiguous().t())),
    ("prompt-last-stride-2", ValueError, "prompt_mask", lambda a: a.__setitem__(1, _every_other_column(a[1]))),
    ("penalties-extra-row", ValueError, "repetition_penalties",
     lambda a: a.__setitem__(3, torch.ones(a[3].shape[0] + 1, dtype=a[3].dtype, device=a[3].device))),
    ("penalties-2d", ValueError, "repetition_penalties", lambda a: a.__setitem__(3, a[3][:, None])),
    ("penalties-bfloat16-for-float16", TypeError, "repetition_penalties",
     lambda a: a.__setitem__(3, a[3].bfloat16())),
    ("penalties-float64", TypeError, "repetition_penalties", lambda a: a.__setitem__(3, a[3].double())),
    ("logits-expanded", ValueError, "logits", lambda a: a.__setitem__(0, a[0][:1].expand(*a[0].shape))),
    ("penalties-inside-logits", ValueError, "repetition_penalties",
     lambda a: a.__setitem__(3, a[0][0, :a[0].shape[0]])),
    ("prompt-inside-logits", ValueError, "prompt_mask", _mask_inside_logits),
    ("penalties-list", TypeError, "repetition_penalties", lambda a: a.__setitem__(3, a[3].tolist())),
    ("output-none", TypeError, "output_mask", lambda a: a.__setitem__(2, None)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_id, exception, argument, change", REJECTED, ids=[c[0] for c in REJECTED])
def test_rejected_before_anything_is_written(device, case_id, exception, argument, change):
    a = list(penalty_args(device, torch.float16, 5, 40))
    change(a)
    logits = a[0]
    snapshot = logits.clone()
    with pytest.raises(exception, match=rf"apply_repetition_penalties_: (.* )?{argument}\b"):
        cupy_ops.apply_repetition_penalties_(*a)
    synchronize(logits.device)
    assert_bitwise_equal(logits, snapshot, "logits after a rejected call")


def test_too_many_tokens_rejected():
    """Warp chunks (32 tokens at the narrowest mask vector) are numbered in 31 bits (fast_divmod): 65536 rows of
    2^20 tokens (2^31 chunks) are refused on meta tensors (validation only, nothing allocated); 32 tokens a row
    fewer (one chunk a row) pass."""
    rows, vocab = 1 << 16, 1 << 20
    def args(vocab):
        masks = [torch.empty(rows, vocab, dtype=torch.bool, device="meta") for _ in range(2)]
        return (torch.empty(rows, vocab, device="meta"), *masks, torch.empty(rows, device="meta"))
    with pytest.raises(ValueError, match=r"apply_repetition_penalties_: logits has 65536 x 1048576 tokens"):
        cupy_ops.apply_repetition_penalties_(*args(vocab))
    cupy_ops.apply_repetition_penalties_(*args(vocab - 32))


# ---- GPU only -----------------------------------------------------------------------------------------------


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 17), (13, 1019), (3, 151936)], ids=str)
@pytest.mark.parametrize("same_mask", [False, True], ids=["two-masks", "one-mask"])
def test_matches_vllm(vllm_ops, dtype, shape, same_mask):
    """vLLM's kernel on its own layout (contiguous, penalties in the logits' dtype): the same bits."""
    logits, prompt, output, penalties = penalty_args("cuda", dtype, *shape, density=0.01, seed=shape[1])
    output = prompt if same_mask else output
    theirs = logits.clone()
    vllm_ops.apply_repetition_penalties_(theirs, prompt, output, penalties)
    cupy_ops.apply_repetition_penalties_(logits, prompt, output, penalties)
    torch.cuda.synchronize()
    assert_bitwise_equal(logits, theirs, "logits against vLLM")


@gpu
@requires_cuda
@pytest.mark.parametrize("layout", ["contiguous", "start-1-apart"])
def test_warps_take_several_chunks(layout, logit_reads):
    """More chunks than resident warps (H200: 132 SMs x at most 64 warps), so warps stride over chunks and
    prefetch the next one: 8192 chunks of 512 tokens at W = 16, 32768 of 32 tokens at W = 1."""
    rows, vocab = (32, 131072) if layout == "contiguous" else (32, 32768)
    args = with_mask_layout(penalty_args("cuda", torch.bfloat16, rows, vocab, density=0.01, seed=1), layout)
    call_and_check(args, f"logits, {layout} masks")


@gpu
@requires_cuda
def test_empty_calls_launch_nothing(monkeypatch):
    from cupy_ops._runtime import launcher

    launches = []
    real_launch = launcher.Launcher.launch
    monkeypatch.setattr(launcher.Launcher, "launch", lambda self, *a: (launches.append(a), real_launch(self, *a)))
    for shape in [(0, 17), (4, 0)]:
        cupy_ops.apply_repetition_penalties_(*penalty_args("cuda", torch.float32, *shape))
    assert launches == []
    cupy_ops.apply_repetition_penalties_(*penalty_args("cuda", torch.float32, 2, 17))
    assert len(launches) == 1


@gpu
@requires_cuda
def test_cuda_graph_replay_reads_current_inputs():
    """A captured call applied again to new logits, masks and penalties written into the same tensors."""
    static = penalty_args("cuda", torch.float16, 7, 1019, seed=1)
    cupy_ops.apply_repetition_penalties_(*[t.clone() for t in static])  # compile and plan outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cupy_ops.apply_repetition_penalties_(*static)
    fresh = penalty_args("cuda", torch.float16, 7, 1019, density=0.3, seed=2)
    for target, value in zip(static, fresh):
        target.copy_(value)
    expected = expected_fp32(static)
    graph.replay()
    assert_matches_fp32_reference(static, expected, "logits after replay")


@gpu
@requires_cuda
def test_cupy_arrays():
    """CuPy arrays (bool masks included; through __cuda_array_interface__, which shares the tensors' memory)
    launch on CuPy's current stream."""
    cupy = pytest.importorskip("cupy")
    args = penalty_args("cuda", torch.float32, 5, 1019, density=0.2, penalty_dtype=torch.float32, seed=4)
    expected = expected_fp32(args)
    torch.cuda.synchronize()
    cupy_ops.apply_repetition_penalties_(*(cupy.asarray(t) for t in args))
    cupy.cuda.get_current_stream().synchronize()
    assert_matches_fp32_reference(args, expected, "logits through CuPy")


@gpu
@requires_two_gpus
def test_tensors_on_a_device_other_than_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: the launch goes to cuda:1; the current device stays 0."""
    torch.cuda.set_device(0)
    for dtype in DTYPES:
        call_and_check(penalty_args("cuda:1", dtype, 5, 1019, seed=6), f"{dtype} logits on cuda:1")
    assert torch.cuda.current_device() == 0


@gpu
@requires_cuda
def test_rejected_cpu_mask_among_cuda_tensors():
    logits, prompt, output, penalties = penalty_args("cuda", torch.float32, 3, 17)
    with pytest.raises(ValueError, match=r"apply_repetition_penalties_: output_mask is on cpu"):
        cupy_ops.apply_repetition_penalties_(logits, prompt, output.cpu(), penalties)
