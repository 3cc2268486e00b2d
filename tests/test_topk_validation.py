"""Input validation of the top-k ops: every rule raises ValueError/TypeError naming the op and the argument, before
anything is launched or written (CPU and meta tensors; no GPU needed)."""

from __future__ import annotations

import pytest
import torch
from topk_utils import DECODE, PERSISTENT, PREFILL, decode_args, persistent_args, prefill_args

from cupy_ops.ops.persistent_topk import persistent_topk_workspace, workspace_bytes


def _prefill(rows=4, width=64, k=8, device="cpu"):
    return prefill_args(torch.randn(rows, width, device=device), [0] * rows, [width] * rows, k, poison=None)


def _decode(rows=4, width=64, k=8, device="cpu"):
    return decode_args(torch.randn(rows, width, device=device), 2, [width] * (rows // 2), k, poison=None)


def _persistent(rows=4, width=64, k=8, device="cpu"):
    return persistent_args(torch.randn(rows, width, device=device), [width] * rows, k, poison=None)


def _replace(args, position, value):
    return args[:position] + (value,) + args[position + 1:]


PREFILL_CASES = [
    # (label, argument position, new value, error, message)
    ("fp16 logits", 0, lambda a: a[0].half(), TypeError, r"logits must be float32"),
    ("int64 starts", 1, lambda a: a[1].long(), TypeError, r"rowStarts must be int32"),
    ("short ends", 2, lambda a: a[2][:3], ValueError, r"rowEnds has 3 elements; expected at least 4"),
    ("2-D starts", 1, lambda a: a[1].view(2, 2), ValueError, r"rowStarts must have 1 dimensions"),
    ("strided starts", 1, lambda a: torch.zeros(8, dtype=torch.int32)[::2], ValueError,
     r"rowStarts must be contiguous"),
    ("int64 indices", 3, lambda a: a[3].long(), TypeError, r"indices must be int32"),
    ("indices columns", 3, lambda a: torch.empty(4, 9, dtype=torch.int32), ValueError,
     r"indices has 9 columns; expected topK = 8"),
    ("indices rows", 3, lambda a: torch.empty(5, 8, dtype=torch.int32), ValueError, r"indices has shape"),
    ("column-strided indices", 3, lambda a: torch.empty(4, 16, dtype=torch.int32)[:, ::2], ValueError,
     r"indices must have a contiguous last dimension"),
    ("numRows", 4, lambda a: 3, ValueError, r"numRows = 3 must equal logits.size\(0\) = 4"),
    ("stride0", 5, lambda a: 63, ValueError, r"stride0 = 63 must equal logits.stride\(0\) = 64"),
    ("stride1", 6, lambda a: 2, ValueError, r"stride1 = 2 must equal logits.stride\(1\) = 1"),
    ("topK 0", 7, lambda a: 0, ValueError, r"topK = 0 must be in \[1, 4096\]"),
    ("topK 4097", 7, lambda a: 4097, ValueError, r"topK = 4097 must be in \[1, 4096\]"),
    ("float topK", 7, lambda a: 8.0, TypeError, r"topK must be an int"),
]


DECODE_CASES = [
    ("next_n 0", 1, lambda a: 0, ValueError, r"next_n = 0 must be >= 1"),
    ("short seq_lens", 2, lambda a: a[2][:1], ValueError, r"seqLens has 1 elements; expected at least 2"),
    ("3-D seq_lens", 2, lambda a: a[2].view(1, 1, 2), ValueError, r"seqLens must have 1 or 2 dimensions"),
    ("float seq_lens", 2, lambda a: a[2].float(), TypeError, r"seqLens must be int32"),
    ("numRows", 4, lambda a: 5, ValueError, r"numRows = 5 must equal logits.size\(0\) = 4"),
]


PERSISTENT_CASES = [
    ("fp16 logits", 0, lambda a: a[0].half(), TypeError, r"logits must be float32"),
    ("column-strided logits", 0, lambda a: torch.randn(4, 128)[:, ::2], ValueError,
     r"logits must have a contiguous last dimension"),
    ("lengths count", 1, lambda a: a[1][:3], ValueError, r"lengths has 3 elements; expected one per row \(4\)"),
    ("int64 lengths", 1, lambda a: a[1].long(), TypeError, r"lengths must be int32"),
    ("output columns", 2, lambda a: torch.empty(4, 16, dtype=torch.int32), ValueError,
     r"output has 16 columns; expected k = 8"),
    ("float32 workspace", 3, lambda a: torch.empty(16), TypeError, r"workspace must be uint8"),
    ("k 0", 4, lambda a: 0, ValueError, r"k = 0 must be in \[1, 4096\]"),
    ("k 5000", 4, lambda a: 5000, ValueError, r"k = 5000 must be in \[1, 4096\]"),
    ("max_seq_len None", 5, lambda a: None, TypeError, r"max_seq_len must be int, got None"),
]


# (op, args maker, case): every op's cases against a valid call of that op.
REJECT_CASES = [(op, make, case) for op, make, cases in ((PREFILL, _prefill, PREFILL_CASES),
                                                          (DECODE, _decode, DECODE_CASES),
                                                          (PERSISTENT, _persistent, PERSISTENT_CASES))
                for case in cases]


@pytest.mark.parametrize("op, make_args, case", REJECT_CASES, ids=[f"{op.name}-{c[0]}" for op, _, c in REJECT_CASES])
def test_rejects(op, make_args, case):
    """A clear error that names the op and the argument."""
    _label, position, value, error, message = case
    args = make_args()
    with pytest.raises(error, match=f"{op.name}: " + message):
        op.public(*_replace(args, position, value(args)))


def test_persistent_accepts_vllm_workspace_and_2d_lengths():
    """vLLM's 1 MiB uint8 workspace, an empty one, and lengths as [B, next_n] with one element per row."""
    args = _persistent()
    PERSISTENT.public(*_replace(args, 3, torch.empty(1 << 20, dtype=torch.uint8)))
    PERSISTENT.public(*_replace(args, 1, args[1].view(2, 2)))
    assert workspace_bytes(128, 163840, 2048) == 0
    ws = persistent_topk_workspace(4, 64, 8, "cpu")
    assert ws.dtype == torch.uint8 and ws.numel() == 0


def test_errors_leave_the_output_untouched():
    args = _prefill()
    args[3].fill_(123)
    with pytest.raises(ValueError):
        PREFILL.public(*_replace(args, 4, 3))
    assert args[3].eq(123).all()


def test_size_one_dimensions_accept_any_stride():
    """A single row or column makes that stride meaningless: vLLM's callers pass whatever torch reports."""
    args = prefill_args(torch.randn(1, 64), [0], [64], 8, poison=None)
    PREFILL.public(*_replace(args, 5, 12345))
    args = prefill_args(torch.randn(4, 1), [0] * 4, [1] * 4, 8, poison=None)
    PREFILL.public(*_replace(args, 6, 7))


def test_too_wide_rows_are_rejected_on_meta():
    logits = torch.empty(1, 2**31, device="meta")
    args = (logits, torch.empty(1, dtype=torch.int32, device="meta"), torch.empty(1, dtype=torch.int32, device="meta"),
            torch.empty(1, 8, dtype=torch.int32, device="meta"), 1, 2**31, 1, 8)
    with pytest.raises(ValueError, match=r"top_k_per_row_prefill: logits has 2147483648 columns"):
        PREFILL.public(*args)


def test_meta_tensors_validate_only():
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in _persistent())
    PERSISTENT.public(*meta)
    with pytest.raises(ValueError, match="persistent_topk: output has 16 columns"):
        PERSISTENT.public(*_replace(meta, 2, torch.empty(4, 16, dtype=torch.int32, device="meta")))


def test_tensors_on_different_devices_are_rejected():
    args = _persistent()
    with pytest.raises(ValueError, match="persistent_topk: .* all tensors must be on one device"):
        PERSISTENT.public(*_replace(args, 3, torch.empty(0, dtype=torch.uint8, device="meta")))
