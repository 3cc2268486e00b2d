"""CUDA tests of persistent_topk (spec: persistent_topk.md 12 and 15): exact equality with the reference (ties to the
lowest index, ascending) plus torch.topk's value multiset, NaN (or 1e30, inf) past every length, every output
slot UNWRITTEN before the call; lengths around k, 8192 and 32768, -1 / 0 / k / W / W + 17; [B, next_n] lengths;
max_seq_len and widths below k; tie-heavy, sorted, low-bits scores; padded and odd row pitches of the scores and of
the output; rows on 16-CTA clusters and rows that stream and shrink; long, short, long rows; CUDA-graph replays
with new lengths; a GPU busy with another kernel (no hang); cuda:1; and vLLM's kernel, equal up to tie order. Sizes
stay small where they can: the file also runs under compute-sanitizer memcheck and racecheck."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from helpers import gpu, requires_cuda, requires_two_gpus
from topk_utils import (
    PERSISTENT,
    UNWRITTEN,
    PaddedOutput,
    assert_contract,
    assert_reference,
    assert_vllm_agrees,
    each_row_kernel,  # noqa: F401 - the fixture every test here uses
    make_scores,
    persistent_args,
)

pytestmark = [gpu, requires_cuda, pytest.mark.usefixtures("each_row_kernel")]


def _scores(kind, rows, width, seed, device="cuda", pitch=None):
    """[rows, width] scores of `kind`, as a view of rows `pitch` elements apart (default: contiguous)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return make_scores(kind, rows, pitch or width, gen, device)[:, :width]


def _run(args, what):
    PERSISTENT.public(*args)
    torch.cuda.synchronize()
    assert_reference(PERSISTENT, args, what=what)
    assert_contract(PERSISTENT, args, what=what)


@pytest.mark.parametrize("k", [512, 1024, 2048])
def test_length_boundaries(k):
    """Around k, 8192 and 32768 (vLLM's path thresholds), -1, 0, W and W + 17, in one batch of width 40960."""
    width = 40960
    lengths = [-1, 0, 1, k - 1, k, k + 1, 8191, 8192, 8193, 32767, 32768, 32769, width, width + 17]
    _run(persistent_args(_scores("randn", len(lengths), width, k), lengths, k), f"boundaries k={k}")


@pytest.mark.parametrize("kind", ["lowbits", "equal", "ties", "special", "neginf", "ascending", "descending"])
def test_score_patterns_on_cluster_rows(kind):
    """4 rows of up to 70000 (16-CTA clusters on sm_90), k 2048."""
    _run(persistent_args(_scores(kind, 4, 70000, 1), [70000, 65537, 40000, 2049], 2048), f"pattern {kind}")


@pytest.mark.parametrize("pitch_extra", [256, 3, 1])
def test_padded_and_odd_pitches(pitch_extra):
    """DeepGEMM pads rows to 256 elements; odd pitches start each row at another 16-byte phase. The output's rows
    are k + pitch_extra apart (a row stride other than k), and its padding columns stay untouched."""
    width, k = 12000, 2048
    logits = _scores("randn", 6, width, 2, pitch=width + pitch_extra)
    output = PaddedOutput(6, k, k + pitch_extra, "cuda")
    args = persistent_args(logits, [width, 3000, 5000, 8000, 11999, 12000], k, max_seq_len=width)
    _run(output.into(PERSISTENT, args), f"pitch W + {pitch_extra}")
    output.assert_padding_untouched(f"output pitch k + {pitch_extra}")


@pytest.mark.parametrize("poison", [1e30, float("inf"), float("-inf")])
def test_tail_poison(poison):
    logits = _scores("randn", 4, 20000, 3)
    _run(persistent_args(logits, [4000, 8000, 16000, 19999], 512, poison=poison), f"poison {poison}")


def test_max_seq_len_below_the_width():
    """max_seq_len caps every length (and the plan: fewer CTAs per row); padding past it is never read."""
    logits = _scores("randn", 4, 163840, 4)
    _run(persistent_args(logits, [163840, 30000, 12000, 100], 2048, max_seq_len=12000), "max_seq_len 12000")


def test_rows_shorter_than_k():
    """max_seq_len 300 < k 2048 on rows of 5000 (lengths around 300 and past W all clamp to at most 300), and rows
    of 100 columns < k: each row is its L indices then the -1 tail, every slot written."""
    k = 2048
    _run(persistent_args(_scores("ties", 6, 5000, 23), [5000, 299, 300, 301, -1, 0], k, max_seq_len=300),
         "max_seq_len 300 < k")
    _run(persistent_args(_scores("randn", 4, 100, 24), [100, 50, 0, 101], k), "width 100 < k")


def test_two_dimensional_lengths():
    """lengths as [B, next_n] (vLLM's MTP decode), one element per row: row r's length is lengths.flat[r]."""
    lengths = [[20000, 19999], [8193, 2049], [2048, -1]]
    _run(persistent_args(_scores("lowbits", 6, 20000, 25), lengths, 2048), "[3, 2] lengths")


@pytest.mark.parametrize("k", [1, 100, 4096])
def test_k_beyond_vllm(k):
    _run(persistent_args(_scores("ties", 5, 30000, k), [30000, k + 1, k, 29000, 5], k), f"k={k}")


def test_long_short_long_rows():
    """vLLM's 'group reused after a short row' regression: long, short, long rows in one batch."""
    lengths = [40960, 2048, 40959, 100, 32769, 2047, 40960]
    _run(persistent_args(_scores("lowbits", len(lengths), 40960, 5), lengths, 2048), "long/short/long")


def test_many_rows_stream_and_shrink():
    """More rows than SMs: 512-thread CTAs whose buffers shrink to their top k while streaming."""
    for rows, width, k in ((256, 32768, 512), (160, 20000, 2048)):
        lengths = [width - (r * 37) % (width // 5) for r in range(rows)]
        _run(persistent_args(_scores("randn", rows, width, rows), lengths, k), f"{rows}x{width} k={k}")
    ramp = persistent_args(_scores("ascending", 140, 20000, 6), [20000 - r for r in range(140)], 1024)
    _run(ramp, "140x20000 ascending")


def test_streaming_shapes():
    """128 x 131072 (one 1024-thread CTA per row, three copy stages, shrinks) and 32 x 163840 (4-CTA clusters whose
    chunks shrink): the issue's bandwidth-bound shapes, results only (the bench times them)."""
    for rows, width, k in ((128, 131072, 2048), (32, 163840, 2048)):
        lengths = torch.randint(int(0.8 * width), width + 1, (rows,)).tolist()
        _run(persistent_args(_scores("randn", rows, width, rows + k), lengths, k), f"{rows}x{width} k={k}")


def test_cuda_graph_replays_with_new_lengths():
    """Captured once; each replay gets new scores and lengths cycling through -1, 0, 1, k - 1, k, 32769, W, W + 17
    (the plan, fixed at capture, depends only on rows, pitch, k and max_seq_len)."""
    rows, width, k = 8, 65536, 2048
    args = persistent_args(_scores("randn", rows, width, 7), [width] * rows, k, poison=None)
    PERSISTENT.public(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        PERSISTENT.public(*args)
    cycle = [-1, 0, 1, k - 1, k, 32769, width, width + 17, 40000, 8193]
    for replay in range(3):
        lengths = [cycle[(replay * 3 + r) % len(cycle)] for r in range(rows)]
        fresh = persistent_args(_scores("lowbits" if replay % 2 else "randn", rows, width, 8 + replay), lengths, k)
        args[0].copy_(fresh[0])
        args[1].copy_(fresh[1])
        args[2].fill_(UNWRITTEN)
        graph.replay()
        torch.cuda.synchronize()
        assert_reference(PERSISTENT, args, what=f"replay {replay} lengths {lengths}")


def test_empty_shapes():
    _run(persistent_args(torch.randn(3, 0, device="cuda"), [5, 0, -1], 16, poison=None), "no columns")
    args = persistent_args(torch.randn(0, 100, device="cuda"), [], 16, poison=None)
    PERSISTENT.public(*args)
    assert args[2].shape == (0, 16)


def test_workspace_is_never_touched():
    """vLLM's 1 MiB workspace passes through unread and unwritten (the schema's `Tensor workspace`)."""
    args = persistent_args(_scores("randn", 4, 163840, 9), [163840] * 4, 2048)
    workspace = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device="cuda")
    before = workspace.clone()
    args = args[:3] + (workspace,) + args[4:]
    _run(args, "1 MiB workspace")
    assert torch.equal(workspace, before)


_BUSY = r"""
extern "C" __global__ void busy(long long cycles, int* sink) {
  extern __shared__ int scratch[];
  const long long start = clock64();
  while (clock64() - start < cycles) {}
  if (threadIdx.x == 0) sink[blockIdx.x] = scratch[0];
}
"""


def test_finishes_while_another_kernel_fills_the_gpu():
    """A kernel whose blocks take every SM (1024 threads and 100 KB each, ~10 ms) runs on another stream; the
    cluster launch waits for SMs and then finishes: no co-residency is ever assumed beyond the hardware cluster."""
    cupy = pytest.importorskip("cupy")
    busy = cupy.RawKernel(_BUSY, "busy")
    busy.max_dynamic_shared_size_bytes = 100 * 1024
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    args = persistent_args(_scores("randn", 4, 163840, 10), [163840, 100000, 40000, 2049], 2048)
    PERSISTENT.public(*args)  # plan and load outside the busy window
    torch.cuda.synchronize()
    sink = cupy.zeros(4 * sms, dtype=cupy.int32)
    side = torch.cuda.Stream()
    with cupy.cuda.ExternalStream(side.cuda_stream):
        busy((4 * sms,), (1024,), (np.int64(20_000_000), sink), shared_mem=100 * 1024)
    args[2].fill_(UNWRITTEN)
    PERSISTENT.public(*args)
    done = torch.cuda.Event()
    done.record()
    deadline = time.monotonic() + 30
    while not done.query():
        assert time.monotonic() < deadline, "persistent_topk did not finish within 30 s next to a busy kernel"
        time.sleep(0.01)
    torch.cuda.synchronize()
    assert_reference(PERSISTENT, args, what="next to a busy kernel")


@requires_two_gpus
def test_tensors_on_the_second_gpu():
    torch.cuda.set_device(0)
    _run(persistent_args(_scores("randn", 4, 163840, 11, "cuda:1"), [163840, 50000, 2048, -1], 2048), "cuda:1")
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("kind", ["randn", "lowbits", "equal"])
@pytest.mark.parametrize("rows, width, k", [(4, 163840, 2048), (4, 65536, 1024), (64, 20000, 512), (8, 40960, 2048)])
def test_equal_to_vllm_up_to_tie_order(vllm_ops, kind, rows, width, k):
    """vLLM's persistent_topk (its 1 MiB workspace) on the same inputs: every row of ours is valid, and wherever
    vLLM's row is a valid top-k its values are ours; without ties (randn) the index sets are identical."""
    lengths = torch.randint(k + 1, width + 1, (rows,), generator=torch.Generator().manual_seed(rows)).tolist()
    lengths[0] = width
    args = persistent_args(_scores(kind, rows, width, rows * k), lengths, k)
    PERSISTENT.public(*args)
    theirs = torch.full_like(args[2], -7)
    vllm_ops.persistent_topk(args[0], args[1], theirs, torch.empty(1 << 20, dtype=torch.uint8, device="cuda"), k,
                             args[5])
    torch.cuda.synchronize()
    assert_contract(PERSISTENT, args, what=f"ours {kind}")
    assert_vllm_agrees(PERSISTENT, args, theirs, exact=kind == "randn")
