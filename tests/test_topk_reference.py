"""The top-k references (the ops' CPU kernels) against torch.topk and against the documented rules: windows and
their clamping, the L <= k shortcut, the tie rule (lowest index), NaN and +-0 order, ascending output; and the CPU
path of every op (every output slot poisoned, then the reference). No GPU needed."""

from __future__ import annotations

import pytest
import torch
from topk_utils import (
    DATA_KINDS,
    DECODE,
    PERSISTENT,
    PREFILL,
    assert_contract,
    assert_reference,
    decode_args,
    make_scores,
    persistent_args,
    prefill_args,
)

from cupy_ops.ops.topk_rows import NAN_KEY, float_keys, select_rows_ref


def test_float_keys_order():
    """Strictly increasing keys along sorted distinct floats; -0 == +0; every NaN one above +inf."""
    values = torch.tensor([float("-inf"), -3.4e38, -1.0, -1e-45, 0.0, 1e-45, 1.0, 3.4e38, float("inf")])
    keys = float_keys(values)
    assert bool((keys[1:] > keys[:-1]).all())
    assert int(float_keys(torch.tensor([-0.0]))) == int(float_keys(torch.tensor([0.0]))) == 0x80000000
    nans = torch.tensor([0x7FC00000, 0xFFC00000 - 2**32, 0x7F800001, -1], dtype=torch.int32).view(torch.float32)
    assert float_keys(nans).tolist() == [NAN_KEY] * 4 and NAN_KEY == int(float_keys(values[-1:])) + 1
    assert int(float_keys(values[:1])) == 0x007FFFFF  # the smallest real key: above the kernel's 0 fillers


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("k", [1, 7, 64, 300])
def test_select_matches_torch_topk(kind, k):
    """Same value multiset as torch.topk, ascending distinct indices, on every score pattern."""
    gen = torch.Generator().manual_seed(k)
    logits = make_scores(kind, 5, 301, gen)
    args = prefill_args(logits, [0, 3, 0, 100, 0], [301, 290, k, 100 + k + 1, k - 1], k, poison=None)
    PREFILL.public(*args)
    assert_contract(PREFILL, args, what=f"{kind} k={k}")


def test_ties_go_to_the_lowest_index():
    logits = torch.tensor([[5.0, 1.0, 5.0, 5.0, 2.0, 5.0, 5.0]])
    got = select_rows_ref(logits, torch.tensor([0]), torch.tensor([7]), 3)
    assert got.tolist() == [[0, 2, 3]]
    got = select_rows_ref(logits, torch.tensor([0]), torch.tensor([7]), 6)
    assert got.tolist() == [[0, 2, 3, 4, 5, 6]]  # 2.0 (index 4) beats 1.0; then all 5.0s


def test_nan_ranks_above_inf_and_zeros_tie():
    logits = torch.tensor([[0.0, float("inf"), float("nan"), -0.0, float("nan"), 1.0, -0.0, 0.0]])
    full = torch.tensor([8])
    assert select_rows_ref(logits, torch.tensor([0]), full, 1).tolist() == [[2]]
    assert select_rows_ref(logits, torch.tensor([0]), full, 3).tolist() == [[1, 2, 4]]
    # 4 slots after NaN, NaN, inf, 1.0: the zeros 0.0 (0), -0.0 (3), -0.0 (6), 0.0 (7) tie; index 0 wins
    assert select_rows_ref(logits, torch.tensor([0]), full, 5).tolist() == [[0, 1, 2, 4, 5]]
    assert select_rows_ref(logits, torch.tensor([0]), full, 6).tolist() == [[0, 1, 2, 3, 4, 5]]


def test_short_rows_list_every_index_then_minus_one():
    logits = torch.randn(3, 10)
    got = select_rows_ref(logits, torch.tensor([0, 2, 9]), torch.tensor([4, 0, 1]), 6)
    assert got.tolist() == [[0, 1, 2, 3, -1, -1], [-1] * 6, [0, -1, -1, -1, -1, -1]]
    # L == k: every index, no -1 (and k larger than the whole width)
    assert select_rows_ref(logits[:1], torch.tensor([0]), torch.tensor([10]), 10).tolist() == [list(range(10))]
    assert select_rows_ref(logits[:1], torch.tensor([0]), torch.tensor([10]), 12).tolist() == [
        list(range(10)) + [-1, -1]]


def test_prefill_windows_are_clamped_and_relative():
    """Indices relative to the clamped start; rowEnd < rowStart, negative starts and ends past W stay in the row."""
    logits = torch.arange(20, dtype=torch.float32).repeat(5, 1)
    args = prefill_args(logits, [3, 10, -4, 15, 0], [8, 2, 3, 40, 20], 4, poison=None)
    PREFILL.public(*args)
    assert args[3].tolist() == [[1, 2, 3, 4], [-1] * 4, [0, 1, 2, -1], [1, 2, 3, 4], [16, 17, 18, 19]]


@pytest.mark.parametrize("layout", ["1-D", "2-D per row", "[B, 1] with next_n 2"])
def test_decode_row_ends(layout):
    """1-D seq_lens: end = seq_len - next_n + j + 1 (clamped at 0 and W); a 2-D [B, next_n] tensor: one length per
    row; a [B, 1] tensor with next_n > 1 uses the 1-D formula on its flat view (vLLM reads past it)."""
    logits = torch.arange(30, dtype=torch.float32).repeat(6, 1)
    seq_lens = {"1-D": [2, 40, 6], "2-D per row": [[0, 3], [-5, 31], [7, 29]],
                "[B, 1] with next_n 2": [[2], [40], [6]]}[layout]
    args = decode_args(logits, 2, seq_lens, 3, poison=None)
    DECODE.public(*args)
    ends = {"1-D": [1, 2, 30, 30, 5, 6], "2-D per row": [0, 3, 0, 30, 7, 29],
            "[B, 1] with next_n 2": [1, 2, 30, 30, 5, 6]}[layout]
    expected = [list(range(e))[-3:] + [-1] * (3 - min(e, 3)) for e in ends]
    assert args[3].tolist() == expected


def test_decode_seq_len_below_next_n_is_empty():
    """seq_lens [2, 6] with next_n 4: row ends [0, 0, 1, 2] and [3, 4, 5, 6] (vLLM's short-seq test)."""
    logits = torch.randn(8, 10)
    args = decode_args(logits, 4, [2, 6], 8, poison=None)
    DECODE.public(*args)
    lengths = (args[3] >= 0).sum(dim=1).tolist()
    assert lengths == [0, 0, 1, 2, 3, 4, 5, 6]


def test_persistent_lengths_are_clamped():
    """L = clamp(length, 0, min(max_seq_len, W)): -1 and 0 are empty, W + 17 is W, max_seq_len caps every row."""
    logits = torch.arange(12, dtype=torch.float32).repeat(5, 1)
    args = persistent_args(logits, [-1, 0, 3, 12, 29], 4, poison=None)
    PERSISTENT.public(*args)
    assert args[2].tolist() == [[-1] * 4, [-1] * 4, [0, 1, 2, -1], [8, 9, 10, 11], [8, 9, 10, 11]]
    args = persistent_args(logits, [-1, 0, 3, 12, 29], 4, max_seq_len=6, poison=None)
    PERSISTENT.public(*args)
    assert args[2].tolist() == [[-1] * 4, [-1] * 4, [0, 1, 2, -1], [2, 3, 4, 5], [2, 3, 4, 5]]
    args = persistent_args(logits, [5, 5, 5, 5, 5], 4, max_seq_len=-3, poison=None)
    PERSISTENT.public(*args)
    assert args[2].eq(-1).all()


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30, float("-inf")])
def test_nothing_outside_the_window_counts(poison):
    """Poisoned columns outside every window never change the result."""
    gen = torch.Generator().manual_seed(3)
    clean = make_scores("randn", 4, 200, gen)
    args = prefill_args(clean.clone(), [5, 0, 50, 0], [180, 60, 199, 200], 32, poison=poison)
    PREFILL.public(*args)
    base = prefill_args(clean.clone(), [5, 0, 50, 0], [180, 60, 199, 200], 32, poison=None)
    PREFILL.public(*base)
    assert torch.equal(args[3], base[3])


def test_persistent_two_dimensional_lengths():
    """lengths as [B, next_n] (vLLM's MTP decode) with one element per row: row r's length is lengths.flat[r]
    (checked against torch.topk's values too, so a misread layout fails even though the CPU kernel is the
    reference); lengths around k, past max_seq_len and negative."""
    logits = make_scores("ties", 6, 500, torch.Generator().manual_seed(6))
    args = persistent_args(logits, [[500, 51], [50, 49], [-1, 1000]], 50, max_seq_len=480)
    PERSISTENT.public(*args)
    assert_reference(PERSISTENT, args, what="[3, 2] lengths")
    assert_contract(PERSISTENT, args, what="[3, 2] lengths")


@pytest.mark.parametrize("op", [PREFILL, DECODE, PERSISTENT], ids=lambda op: op.name)
def test_cpu_kernel_writes_the_reference(op):
    """The public function on CPU tensors (every output slot UNWRITTEN before) writes exactly the reference, and a
    valid top-k by torch.topk's values."""
    gen = torch.Generator().manual_seed(5)
    logits = make_scores("ties", 6, 500, gen)
    if op is PREFILL:
        args = prefill_args(logits, [0, 1, 2, 3, 4, 5], [500, 499, 300, 60, 5, 0], 50)
    elif op is DECODE:
        args = decode_args(logits, 3, [500, 52], 50)
    else:
        args = persistent_args(logits, [500, 51, 50, 49, -1, 1000], 50, max_seq_len=480)
    op.public(*args)
    assert_reference(op, args, what=f"{op.name} on the CPU")
    assert_contract(op, args, what=f"{op.name} on the CPU")
