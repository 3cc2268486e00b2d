"""CUDA-only tests of merge_attn_states: the spec's size matrix, CuPy arrays on CuPy's current stream, CUDA graph
capture and replay, a non-current device, 64-bit offsets, and no launch for empty inputs. Outputs are poisoned
and compared with the float64 reference (run_and_check). Without a GPU every test here skips."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from merge_utils import (
    LAYOUTS,
    OUTPUT_KINDS,
    MergeCase,
    assert_bitwise_equal,
    assert_close,
    assert_untouched,
    check_outputs,
    gpu,
    make_case,
    poison_,
    random_lse,
    requires_cuda,
    run_and_check,
    strided,
)

import cupy_ops

pytestmark = [gpu, requires_cuda]


# The spec's matrix is dtypes x n {0, 1, 7, 513, 4096} x h {1, 8, 32, 128} x d {64, 80, 96, 128, 256, odd}
# (720 cases, 120 per kind). Pruned to two crossed planes that keep every value of every axis:
# - every output kind x every head size at one n, h (513 x 8: odd, several blocks): what the vector width and
#   the fp8 conversion depend on;
# - every n x every h at d = 128, bfloat16: what the grid and the row -> (token, head) division depend on.
# The prefill count, output_lse None and layouts are crossed with a few of these below.


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256, 5])
def test_matrix_dtype_by_head_size(kind, d):
    dtype, fp8 = OUTPUT_KINDS[kind]
    run_and_check(make_case(513, 8, d, dtype, "cuda", fp8=fp8, seed=d))


@pytest.mark.parametrize("n", [0, 1, 7, 513, 4096])
@pytest.mark.parametrize("h", [1, 8, 32, 128])
def test_matrix_tokens_by_heads(n, h):
    run_and_check(make_case(n, h, 128, torch.bfloat16, "cuda", seed=n + h))


@pytest.mark.parametrize("kind", ["bfloat16", "bfloat16-to-fp8"])
@pytest.mark.parametrize("p_kind", ["none", "zero", "half", "all"])
@pytest.mark.parametrize("with_output_lse", [True, False], ids=["lse", "no-lse"])
def test_matrix_prefill_tokens(kind, p_kind, with_output_lse):
    """p in {None, 0, n // 2, n} x output_lse or not, at a serving-like 513 x 32 x 128."""
    dtype, fp8 = OUTPUT_KINDS[kind]
    n = 513
    p = {"none": None, "zero": 0, "half": n // 2, "all": n}[p_kind]
    run_and_check(make_case(n, 32, 128, dtype, "cuda", fp8=fp8, p=p, with_output_lse=with_output_lse, seed=5))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matrix_layouts(layout):
    """Every layout at 513 x 32 x 96 (many blocks; test_merge_cases covers every kind at a small size)."""
    run_and_check(make_case(513, 32, 96, torch.float16, "cuda", p=300, layout=layout, seed=6))


# ---- CuPy arrays ----------------------------------------------------------------------------------------------

_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {}
}
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "head_slice"])
def test_cupy_arrays_on_cupys_current_stream(dtype, layout):
    """CuPy arrays in, launched on CuPy's current stream. The inputs reach their arrays only on a non-blocking
    CuPy stream, after a ~50 ms spin kernel there: a launch on any other stream would read zeros instead."""
    import cupy

    n, h, d, p = 300, 8, 128, 200
    source = make_case(n, h, d, dtype, "cuda", p=p, layout=layout, seed=12)
    expected_out, expected_lse = source.reference()

    if dtype == torch.bfloat16:
        def as_cupy(t):
            """CuPy cannot make bfloat16 arrays itself: share the tensor through DLPack (needs ml_dtypes)."""
            return cupy.from_dlpack(t)

        try:
            as_cupy(source.prefix_output[:1])
        except (NotImplementedError, TypeError, ValueError, BufferError) as exc:  # no ml_dtypes, or no bf16 here
            pytest.skip(f"cupy.from_dlpack of a bfloat16 tensor failed: {exc!r}")
    else:
        def as_cupy(t):
            """A CuPy-made array holding t's values (from host memory)."""
            return cupy.asarray(t.cpu().numpy())

    def cupy_view(t: torch.Tensor, buffer: torch.Tensor):
        """(CuPy view shaped like t, CuPy buffer): a CuPy array holding `buffer`, and t's view of it."""
        array = as_cupy(buffer)
        view = cupy.lib.stride_tricks.as_strided(array[t.storage_offset():], t.shape,
                                                 tuple(s * array.itemsize for s in t.stride()))
        return view, array

    # Inputs: CuPy arrays of zeros, and the true values in CuPy arrays to copy over on the stream.
    inputs = {}
    for name in ("prefix_output", "prefix_lse", "suffix_output", "suffix_lse"):
        t = getattr(source, name).contiguous()
        values = as_cupy(t)
        target = cupy.zeros_like(values) if dtype != torch.bfloat16 else as_cupy(torch.zeros_like(t))
        inputs[name] = (target, values)
    (out_view, out_buffer, _), (lse_view, lse_buffer, _) = source.outputs
    snapshots = [poison_(out_buffer).clone(), poison_(lse_buffer).clone()]
    out_cp, out_buffer_cp = cupy_view(out_view, out_buffer)
    lse_cp, lse_buffer_cp = cupy_view(lse_view, lse_buffer)
    spin = cupy.RawKernel(_SPIN, "spin")
    cupy.cuda.Device().synchronize()

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        spin((1,), (1,), (np.int64(100_000_000),))  # ~50 ms at H100 clocks
        for target, values in inputs.values():
            target.data.copy_from_device_async(values.data, values.nbytes, stream)
        cupy_ops.merge_attn_states(out_cp, lse_cp, inputs["prefix_output"][0], inputs["prefix_lse"][0],
                                   inputs["suffix_output"][0], inputs["suffix_lse"][0], p, None)
    stream.synchronize()

    result = MergeCase(torch.from_dlpack(out_cp), torch.from_dlpack(lse_cp), source.prefix_output.contiguous(),
                       source.prefix_lse.contiguous(), source.suffix_output.contiguous(),
                       source.suffix_lse.contiguous(), p, None, [])
    check_outputs(result, expected_out, expected_lse)
    for view, buffer_cp, snapshot, name in ((out_view, out_buffer_cp, snapshots[0], "output"),
                                            (lse_view, lse_buffer_cp, snapshots[1], "output_lse")):
        assert_untouched(view, torch.from_dlpack(buffer_cp), snapshot, name)


# ---- CUDA graphs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [False, True], ids=["bfloat16", "bfloat16-to-fp8"])
def test_cuda_graph_replay_reads_current_inputs(fp8):
    """Captured on torch's capture stream (nothing runs at capture), then replayed twice after the inputs, and
    for fp8 the output_scale, were changed in place: each replay matches the reference of the current values."""
    n, h, d, p = 257, 8, 128, 200
    case = make_case(n, h, d, torch.bfloat16, "cuda", fp8=fp8, p=p, seed=1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the kernel is compiled and loaded outside the capture
        cupy_ops.merge_attn_states(*case.args())
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    snapshots = [poison_(buffer).clone() for _, buffer, _ in case.outputs]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cupy_ops.merge_attn_states(*case.args())
    torch.cuda.synchronize()
    for (_, buffer, name), snapshot in zip(case.outputs, snapshots):
        assert_bitwise_equal(buffer, snapshot, f"{name} after capture (the launch must be recorded, not run)")

    for seed, scale in ((2, 0.05), (3, 0.005)):
        fresh = make_case(n, h, d, torch.bfloat16, "cuda", fp8=fp8, p=p, seed=seed, scale=scale)
        for name in ("prefix_output", "prefix_lse", "suffix_output", "suffix_lse"):
            getattr(case, name).copy_(getattr(fresh, name))
        if fp8:
            case.output_scale.copy_(fresh.output_scale)
        snapshots = [poison_(buffer).clone() for _, buffer, _ in case.outputs]
        graph.replay()
        torch.cuda.synchronize()
        check_outputs(case, *case.reference())
        for (view, buffer, name), snapshot in zip(case.outputs, snapshots):
            assert_untouched(view, buffer, snapshot, name)


# ---- devices, sizes, launches -----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_tensors_on_a_device_other_than_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current: the launch goes to cuda:1, and the current device stays 0."""
    torch.cuda.set_device(0)
    run_and_check(make_case(129, 8, 128, torch.float16, "cuda:1", p=100, seed=3))
    run_and_check(make_case(129, 8, 128, torch.bfloat16, "cuda:1", fp8=True, seed=4))
    assert torch.cuda.current_device() == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_a_new_thread_launching_on_the_second_gpu():
    """A thread that never touched CUDA launches on cuda:1 tensors (its current device is 0: the checked path),
    then makes cuda:1 current and launches the same layout again (the cached path); outputs poisoned first,
    checked against the float64 reference here."""
    cases = [make_case(129, 8, 128, torch.bfloat16, "cuda:1", seed=seed) for seed in (5, 6)]
    expected = [case.reference() for case in cases]
    for case in cases:
        for _, buffer, _ in case.outputs:
            poison_(buffer)
    torch.cuda.synchronize(1)
    errors = []

    def launch_both() -> None:
        try:
            cupy_ops.merge_attn_states(*cases[0].args())
            torch.cuda.set_device(1)
            cupy_ops.merge_attn_states(*cases[1].args())
        except BaseException as error:  # noqa: BLE001 - re-raised by the assert below
            errors.append(error)

    thread = threading.Thread(target=launch_both)
    thread.start()
    thread.join()
    assert not errors, errors
    torch.cuda.synchronize(1)
    for case, (expected_out, expected_lse) in zip(cases, expected):
        check_outputs(case, expected_out, expected_lse)


def _require_free_gib(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def test_offsets_past_2_pow_31_elements():
    """n x h x d = 2^31 + 2^17 bfloat16 elements per tensor (~4.3 GB each): the last rows sit past 32-bit
    element offsets (vllm#45500). Every output element is written (NaN poison gone); sampled rows, first, last
    and random, match the reference computed on those rows."""
    _require_free_gib(20)
    n, h, d = 2**17 + 8, 128, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    prefix = torch.randn(n, h, d, generator=g, device="cuda", dtype=torch.bfloat16)
    suffix = torch.randn(n, h, d, generator=g, device="cuda", dtype=torch.bfloat16)
    prefix_lse, suffix_lse = random_lse(h, n, g, "cuda")
    out = poison_(torch.empty_like(prefix))
    out_lse = poison_(torch.empty(h, n, device="cuda"))
    cupy_ops.merge_attn_states(out, out_lse, prefix, prefix_lse, suffix, suffix_lse)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "some output elements were not written"
    rows = torch.cat([torch.tensor([0, 1, n // 2, n - 2, n - 1]),
                      torch.randint(0, n, (8,), generator=torch.Generator().manual_seed(1))]).cuda()
    want_out, want_lse = cupy_ops.merge_attn_states_ref(out[rows], out_lse[:, rows], prefix[rows],
                                                        prefix_lse[:, rows], suffix[rows], suffix_lse[:, rows],
                                                        compute_dtype=torch.float64)
    assert_close(out[rows], want_out, "output on sampled tokens")
    assert_close(out_lse[:, rows], want_lse, "output_lse on sampled tokens")


def test_output_token_stride_past_2_pow_31_elements():
    """Small tensors, but the output's second token sits 2^31 elements after its first (a 4.3 GB buffer): one
    tensor's offsets alone must switch the kernel to 64-bit offsets."""
    _require_free_gib(20)
    n, h, d = 2, 4, 64
    case = make_case(n, h, d, torch.bfloat16, "cuda", seed=2)
    case.output, buffer = strided((n, h, d), (2**31, d, 1), 0, torch.bfloat16, "cuda")
    case.outputs[0] = (case.output, buffer, "output")
    run_and_check(case)


def test_empty_inputs_launch_nothing(monkeypatch):
    """n = 0 or h = 0: no kernel launch at all (and nothing written); a non-empty call launches once, so the
    counter does see launches."""
    from cupy_ops._runtime import launcher

    real_launch = launcher.Launcher.launch
    launches = []

    def counting_launch(self, *args, **kwargs):
        launches.append(args)
        return real_launch(self, *args, **kwargs)

    monkeypatch.setattr(launcher.Launcher, "launch", counting_launch)
    for shape in [(0, 8, 128), (4, 0, 128)]:
        run_and_check(make_case(*shape, torch.bfloat16, "cuda", layout="head_slice"))
        run_and_check(make_case(*shape, torch.float16, "cuda", fp8=True))
    assert launches == []
    run_and_check(make_case(3, 8, 128, torch.bfloat16, "cuda"))
    assert len(launches) == 1
