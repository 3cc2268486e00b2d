"""CUDA tests of top_k_per_row_prefill and top_k_per_row_decode (spec: sampler_ops.md 2.10 and 3): every result
equals the reference exactly (our tie rule and ascending order) and, checked apart from it, torch.topk's value
multiset; NaN poisons everything outside the windows and every output slot starts UNWRITTEN. Shapes: k - 1 / k /
k + 1 windows, unaligned starts, windows clamped to the row, rows narrower than k, strided columns, low-bits /
all-equal / +-inf / sorted scores, rows long enough for 16-CTA clusters and for the streaming shrink, a padded
output, CUDA-graph replay with changed windows, cuda:1, and vLLM's kernel where it is correct. Sizes stay
small where they can: the file also runs under compute-sanitizer memcheck and racecheck."""

from __future__ import annotations

import pytest
import torch
from helpers import gpu, requires_cuda, requires_two_gpus
from topk_utils import (
    DATA_KINDS,
    DECODE,
    PREFILL,
    UNWRITTEN,
    PaddedOutput,
    assert_contract,
    assert_reference,
    assert_vllm_agrees,
    decode_args,
    each_row_kernel,  # noqa: F401 - the fixture every test here uses
    make_scores,
    prefill_args,
)

import cupy_ops

pytestmark = [gpu, requires_cuda, pytest.mark.usefixtures("each_row_kernel")]


def _scores(kind, rows, width, seed, device="cuda"):
    return make_scores(kind, rows, width, torch.Generator(device=device).manual_seed(seed), device)


def _run(op, args, what):
    op.public(*args)
    torch.cuda.synchronize()
    assert_reference(op, args, what=what)
    assert_contract(op, args, what=what)


def _boundary_windows(width, k):
    """(starts, ends): lengths k - 1, k, k + 1, 2k + 3, the rest of the row from an unaligned start, 0, inverted."""
    starts = [0, 5, 3, 1, 7, 9, 50]
    ends = [k - 1, 5 + k, 3 + k + 1, 1 + 2 * k + 3, width, 9, 10]
    return starts, ends


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_prefill_every_score_pattern(kind):
    width, k = 9000, 2048
    starts, ends = _boundary_windows(width, k)
    _run(PREFILL, prefill_args(_scores(kind, len(starts), width, 1), starts, ends, k), f"prefill {kind}")


@pytest.mark.parametrize("k", [1, 7, 512, 1024, 3000, 4096])
def test_prefill_any_k(k):
    width = 3 * k + 11
    starts, ends = _boundary_windows(width, k)
    _run(PREFILL, prefill_args(_scores("randn", len(starts), width, k), starts, ends, k), f"prefill k={k}")


def test_rows_narrower_than_k():
    """5 rows of 100 columns, k 2048: every window is shorter than k (the whole row, [3, 50), empty, a start clamped
    from -4, the last column), so each row is its window's indices then ~2000 slots of -1; decode over the same
    widths (seq_len 2049 and -3 clamp to 100 and 0)."""
    width, k = 100, 2048
    _run(PREFILL, prefill_args(_scores("ties", 5, width, 20), [0, 3, 0, -4, 99], [100, 50, 0, 30, 100], k),
         "prefill width 100 < k")
    _run(DECODE, decode_args(_scores("ties", 5, width, 21), 1, [100, 50, 0, 2049, -3], k), "decode width 100 < k")


def test_prefill_windows_outside_the_row():
    """start = clamp(rowStart, 0, W), end = clamp(rowEnd, start, W) (the op's docstring): starts -4 (window
    [0, 30)), W + 5 (empty), -1 with end W (the whole row), -3000 with end 4000 (L > k from a clamped start)."""
    width, k = 5000, 2048
    args = prefill_args(_scores("randn", 4, width, 22), [-4, width + 5, -1, -3000], [30, width + 9, width, 4000], k)
    _run(PREFILL, args, "prefill windows outside the row")


def test_prefill_many_causal_rows():
    """vLLM's test layout (row r's window is [0, r + 1)) past 2k rows: every row from the shortcut to k + 2."""
    rows, k = 2050, 2048
    ends = list(range(1, rows + 1))
    _run(PREFILL, prefill_args(_scores("randn", rows, rows, 2), [0] * rows, ends, k), "causal prefill")


@pytest.mark.parametrize("poison", [float("nan"), 1e30, float("inf")])
def test_decode_next_n_and_dirty_tails(poison):
    """next_n 1, 2, 4, 8 with sequences shorter than next_n (empty rows) and 1e30 / NaN / inf past each end."""
    for next_n in (1, 2, 4, 8):
        seq_lens = [3000, 5, 2049, next_n - 1, 2048]
        rows = len(seq_lens) * next_n
        args = decode_args(_scores("randn", rows, 3000, next_n), next_n, seq_lens, 2048, poison=poison)
        _run(DECODE, args, f"decode next_n={next_n} poison={poison}")


def test_decode_two_dimensional_seq_lens():
    """[B, next_n] seq_lens with B * next_n rows: one length per row; [B, 1] with next_n 3: the 1-D formula."""
    seq_lens = [[0, 1, 2048], [2049, 5000, -3], [4999, 4998, 4100]]
    _run(DECODE, decode_args(_scores("lowbits", 9, 5000, 3), 3, seq_lens, 2048), "decode 2-D per row")
    _run(DECODE, decode_args(_scores("lowbits", 9, 5000, 4), 3, [[5000], [2050], [2]], 2048), "decode [B, 1]")


@pytest.mark.parametrize("kind", ["randn", "lowbits", "ties"])
def test_decode_long_rows_use_clusters(kind):
    """4 rows of 163840 (16-CTA clusters on sm_90) and 2 of 300000 (vLLM's split path), lengths 80-100%."""
    for rows, width in ((4, 163840), (2, 300000)):
        seq_lens = [width - 7 * r * width // 100 for r in range(rows)]
        _run(DECODE, decode_args(_scores(kind, rows, width, rows), 1, seq_lens, 2048), f"decode {rows}x{width}")


def test_decode_many_rows_stream_and_shrink():
    """200 rows of 20000 with k 2048: more CTAs than SMs, so the buffer streams (shrinks to its top k as it
    fills); ascending scores shrink at every group."""
    for kind in ("randn", "ascending"):
        args = decode_args(_scores(kind, 200, 20000, 5), 1, [20000 - 13 * r for r in range(200)], 2048)
        _run(DECODE, args, f"decode 200x20000 {kind}")


def test_minus_inf_fills_the_last_slots():
    """Rows with more than k entries, fewer than k of them finite: -inf fills the rest with valid indices (vLLM's
    radix path can write garbage there)."""
    k, width = 2048, 20000
    logits = torch.full((3, width), float("-inf"), device="cuda")
    logits[:, ::17] = torch.randn(3, -(-width // 17), device="cuda")
    _run(PREFILL, prefill_args(logits, [0, 1, 2], [width, width - 1, 4000], k), "prefill -inf fill")
    _run(DECODE, decode_args(logits.clone(), 1, [width, 13000, 2049], k), "decode -inf fill")


def test_strided_columns():
    """stride1 = 3 (element loads) for prefill and decode, and an offset view (misaligned row starts)."""
    buffer = _scores("randn", 5, 3 * 7000 + 2, 6)
    view = buffer[:, 2::3]
    starts, ends = _boundary_windows(7000, 1024)
    _run(PREFILL, prefill_args(view, starts[:5], ends[:5], 1024), "prefill stride1 = 3")
    _run(DECODE, decode_args(buffer[:, 1::3], 1, [7000, 6999, 1025, 1024, 3], 1024), "decode stride1 = 3")


def test_unaligned_row_pitch():
    """An odd row pitch: every row starts at another 16-byte phase; the output has a padded row stride too, whose
    padding columns stay untouched."""
    logits = _scores("randn", 6, 10001, 7)[:, :9999]
    output = PaddedOutput(6, 4096, 4100, "cuda")
    _run(DECODE, output.into(DECODE, decode_args(logits, 2, [9999, 5000, 4097], 4096)), "decode odd pitch")
    output.assert_padding_untouched("decode odd pitch, padded output")


def test_cuda_graph_replay_with_changed_windows():
    """Captured once (plan made before the capture), replayed after the scores and every window changed."""
    rows, width, k = 8, 40000, 2048
    prefill = prefill_args(_scores("randn", rows, width, 8), [0] * rows, [width] * rows, k, poison=None)
    decode = decode_args(_scores("randn", rows, width, 9), 2, [width] * (rows // 2), k, poison=None)
    for op, args in ((PREFILL, prefill), (DECODE, decode)):
        op.public(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        PREFILL.public(*prefill)
        DECODE.public(*decode)
    for seed in (10, 11, 12):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        for args in (prefill, decode):
            args[0].copy_(torch.randn(rows, width, generator=gen, device="cuda"))
        prefill[1].copy_(torch.randint(0, 100, (rows,), generator=gen, device="cuda", dtype=torch.int32))
        prefill[2].copy_(torch.randint(0, width + 100, (rows,), generator=gen, device="cuda", dtype=torch.int32))
        decode[2].copy_(torch.randint(-2, width + 50, (rows // 2,), generator=gen, device="cuda", dtype=torch.int32))
        prefill[3].fill_(UNWRITTEN)  # so each replay must write every slot again
        decode[3].fill_(UNWRITTEN)
        graph.replay()
        torch.cuda.synchronize()
        assert_reference(PREFILL, prefill, what=f"prefill replay {seed}")
        assert_reference(DECODE, decode, what=f"decode replay {seed}")


def test_empty_shapes():
    """No columns (every row empty: all -1) and no rows (nothing launched)."""
    logits = torch.randn(3, 0, device="cuda")
    _run(PREFILL, prefill_args(logits, [0, 0, 1], [5, 0, 2], 4, poison=None), "prefill, no columns")
    _run(DECODE, decode_args(logits, 1, [5, 0, 2], 4, poison=None), "decode, no columns")
    args = decode_args(torch.randn(0, 10, device="cuda"), 1, [], 4, poison=None)
    DECODE.public(*args)
    assert args[3].shape == (0, 4)


def test_same_bits_every_call():
    args = decode_args(_scores("ties", 4, 50000, 13), 1, [50000, 40000, 30000, 20000], 2048)
    DECODE.public(*args)
    first = args[3].clone()
    for _ in range(3):
        args[3].fill_(UNWRITTEN)
        DECODE.public(*args)
        assert torch.equal(args[3], first)


@requires_two_gpus
def test_tensors_on_the_second_gpu():
    """cuda:1 tensors while cuda:0 is current (clusters on the long rows): results right, current device kept."""
    torch.cuda.set_device(0)
    _run(DECODE, decode_args(_scores("randn", 4, 163840, 14, "cuda:1"), 1, [163840, 100000, 2049, 5], 2048),
         "decode on cuda:1")
    _run(PREFILL, prefill_args(_scores("lowbits", 3, 5000, 15, "cuda:1"), [0, 1, 2], [5000, 3000, 9], 512),
         "prefill on cuda:1")
    assert torch.cuda.current_device() == 0


def test_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    args = prefill_args(_scores("randn", 4, 6000, 16), [0, 1, 2, 3], [6000, 5000, 2000, 3], 1024)
    expected = PREFILL.reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])[0]
    arrays = [cupy.asarray(a) if isinstance(a, torch.Tensor) else a for a in args]
    cupy_ops.top_k_per_row_prefill(*arrays)
    cupy.cuda.get_current_stream().synchronize()
    assert torch.equal(torch.as_tensor(cupy.asnumpy(arrays[3])), expected)


# ---- vLLM's kernel (anchor library) -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["randn", "lowbits", "neginf"])
@pytest.mark.parametrize("k", [512, 2048, 3000])
def test_agrees_with_vllm_where_vllm_is_correct(vllm_ops, kind, k):
    """vLLM's prefill and decode on the same inputs (valid windows only: vLLM writes out of bounds for inverted
    ones): wherever its row is a valid top-k (in-window, distinct, right values: any order and tie choice), the
    value multisets agree with ours. On randn scores every vLLM row must be valid, so the comparison is not empty,
    and without ties the index sets are equal too."""
    width = 30000
    starts, ends = _boundary_windows(width, k)
    for op, args, call in (
            (PREFILL, prefill_args(_scores(kind, 6, width, k), starts[:6], ends[:6], k),
             vllm_ops.top_k_per_row_prefill),
            (DECODE, decode_args(_scores(kind, 8, width, k + 1), 2, [width, k + 1, 3 * k, 17], k),
             vllm_ops.top_k_per_row_decode)):
        op.public(*args)
        theirs = torch.full_like(args[3], -7)
        call(*args[:3], theirs, *args[4:])
        torch.cuda.synchronize()
        assert_contract(op, args, what=f"{op.name} {kind}")
        assert_vllm_agrees(op, args, theirs, exact=kind == "randn")
