"""Input validation of the top-k ops: every rule raises ValueError/TypeError naming the op and the argument, before
anything is launched or written. Each rejection runs on the CPU (the reference kernel's path) and on CUDA tensors
(the fast acceptance path runs first there): both must reject the same calls. Width limits on meta tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, assert_bitwise_equal, synchronize
from topk_utils import (
    DECODE,
    PERSISTENT,
    PREFILL,
    assert_contract,
    assert_reference,
    decode_args,
    persistent_args,
    prefill_args,
    replace_arg,
)

from cupy_ops.ops.persistent_topk import persistent_topk_workspace, workspace_bytes
from cupy_ops.ops.topk_rows import MAX_ROWS, MAX_WIDTH

ROWS, WIDTH, K = 4, 64, 8  # the valid base call of every case: 4 rows of 64 scores, k 8


def _prefill(device):
    return prefill_args(torch.randn(ROWS, WIDTH, device=device), [0] * ROWS, [WIDTH] * ROWS, K, poison=None)


def _decode(device):
    """next_n 2 over two sequences: seq_lens has ROWS / 2 elements."""
    return decode_args(torch.randn(ROWS, WIDTH, device=device), 2, [WIDTH] * (ROWS // 2), K, poison=None)


def _persistent(device):
    return persistent_args(torch.randn(ROWS, WIDTH, device=device), [WIDTH] * ROWS, K, poison=None)


def _ints(a, *shape):
    """int32 zeros of `shape` on the call's device."""
    return torch.zeros(*shape, dtype=torch.int32, device=a[0].device)


# Each case: (label, argument position, new value from the valid args, error, message after "<op>: ").
PREFILL_CASES = [
    ("fp16 logits", 0, lambda a: a[0].half(), TypeError, r"logits must be float32"),
    ("int64 starts", 1, lambda a: a[1].long(), TypeError, r"rowStarts must be int32"),
    ("short ends", 2, lambda a: a[2][:3], ValueError, r"rowEnds has 3 elements; expected at least 4"),
    ("2-D starts", 1, lambda a: a[1].view(2, 2), ValueError, r"rowStarts must have 1 dimensions"),
    ("strided starts", 1, lambda a: _ints(a, 8)[::2], ValueError, r"rowStarts must be contiguous"),
    ("int64 indices", 3, lambda a: a[3].long(), TypeError, r"indices must be int32"),
    ("indices columns", 3, lambda a: _ints(a, 4, 9), ValueError, r"indices has 9 columns; expected topK = 8"),
    ("indices rows", 3, lambda a: _ints(a, 5, 8), ValueError, r"indices has shape"),
    ("column-strided indices", 3, lambda a: _ints(a, 4, 16)[:, ::2], ValueError,
     r"indices must have a contiguous last dimension"),
    ("numRows", 4, lambda a: 3, ValueError, r"numRows = 3 must equal logits.size\(0\) = 4"),
    ("stride0", 5, lambda a: 63, ValueError, r"stride0 = 63 must equal logits.stride\(0\) = 64"),
    ("stride1", 6, lambda a: 2, ValueError, r"stride1 = 2 must equal logits.stride\(1\) = 1"),
    ("topK 0", 7, lambda a: 0, ValueError, r"topK = 0 must be in \[1, 4096\]"),
    ("topK 4097", 7, lambda a: 4097, ValueError, r"topK = 4097 must be in \[1, 4096\]"),
    ("float topK", 7, lambda a: 8.0, TypeError, r"topK must be an int"),
    # memory shared with the written indices: the kernel would read what it writes, or write a slot twice
    ("rowEnds inside indices", 2, lambda a: a[3].view(-1)[:4], ValueError, r"indices overlaps rowEnds in memory"),
    ("rowStarts inside indices", 1, lambda a: a[3].view(-1)[4:8], ValueError,
     r"indices overlaps rowStarts in memory"),
    ("indices inside logits", 3, lambda a: a[0].view(torch.int32)[:, :8], ValueError,
     r"indices overlaps logits in memory"),
    ("expanded indices", 3, lambda a: a[3][:1].expand(4, 8), ValueError,
     r"indices must not have elements that share memory"),
]


DECODE_CASES = [
    ("next_n 0", 1, lambda a: 0, ValueError, r"next_n = 0 must be in \[1, 2\^31 - 1\]"),
    ("next_n 2^31", 1, lambda a: 2**31, ValueError, r"next_n = 2147483648 must be in \[1, 2\^31 - 1\]"),  # int32
    ("short seq_lens", 2, lambda a: a[2][:1], ValueError, r"seq_lens has 1 elements; expected at least 2"),
    ("3-D seq_lens", 2, lambda a: a[2].view(1, 1, 2), ValueError, r"seq_lens must have 1 or 2 dimensions"),
    ("float seq_lens", 2, lambda a: a[2].float(), TypeError, r"seq_lens must be int32"),
    # [B, next_n] with one length a row, but every other column of a wider buffer
    ("strided 2-D seq_lens", 2, lambda a: _ints(a, 2, 4)[:, ::2], ValueError,
     r"seq_lens must be contiguous, got strides \(4, 2\)"),
    ("numRows", 4, lambda a: 5, ValueError, r"numRows = 5 must equal logits.size\(0\) = 4"),
    ("stride0", 5, lambda a: 63, ValueError, r"stride0 = 63 must equal logits.stride\(0\) = 64"),
    ("stride1", 6, lambda a: 2, ValueError, r"stride1 = 2 must equal logits.stride\(1\) = 1"),
    ("topK against indices", 7, lambda a: 9, ValueError, r"indices has 8 columns; expected topK = 9"),
    ("seq_lens inside indices", 2, lambda a: a[3].view(-1)[:2], ValueError, r"indices overlaps seq_lens in memory"),
    ("expanded indices", 3, lambda a: a[3][:1].expand(4, 8), ValueError,
     r"indices must not have elements that share memory"),
]


PERSISTENT_CASES = [
    ("fp16 logits", 0, lambda a: a[0].half(), TypeError, r"logits must be float32"),
    ("column-strided logits", 0, lambda a: torch.randn(4, 128, device=a[0].device)[:, ::2], ValueError,
     r"logits must have a contiguous last dimension"),
    ("lengths count", 1, lambda a: a[1][:3], ValueError, r"lengths has 3 elements; expected one per row \(4\)"),
    ("int64 lengths", 1, lambda a: a[1].long(), TypeError, r"lengths must be int32"),
    ("strided lengths", 1, lambda a: _ints(a, 8)[::2], ValueError, r"lengths must be contiguous, got strides \(2,\)"),
    ("strided 2-D lengths", 1, lambda a: _ints(a, 2, 4)[:, ::2], ValueError,
     r"lengths must be contiguous, got strides \(4, 2\)"),
    ("3-D lengths", 1, lambda a: a[1].view(1, 2, 2), ValueError, r"lengths must have 1 or 2 dimensions"),
    ("output columns", 2, lambda a: _ints(a, 4, 16), ValueError, r"output has 16 columns; expected k = 8"),
    ("column-strided output", 2, lambda a: _ints(a, 4, 16)[:, ::2], ValueError,
     r"output must have a contiguous last dimension"),
    ("float32 workspace", 3, lambda a: torch.empty(16, device=a[0].device), TypeError, r"workspace must be uint8"),
    ("k 0", 4, lambda a: 0, ValueError, r"k = 0 must be in \[1, 4096\]"),
    ("k 5000", 4, lambda a: 5000, ValueError, r"k = 5000 must be in \[1, 4096\]"),
    ("max_seq_len None", 5, lambda a: None, TypeError, r"max_seq_len must be int, got None"),
    ("lengths inside output", 1, lambda a: a[2].view(-1)[:4], ValueError, r"output overlaps lengths in memory"),
    ("output inside logits", 2, lambda a: a[0].view(torch.int32)[:, :8], ValueError,
     r"output overlaps logits in memory"),
    ("expanded output", 2, lambda a: a[2][:1].expand(4, 8), ValueError,
     r"output must not have elements that share memory"),
    # the workspace is never touched, but vLLM's kernel writes it: sharing it with the output stays an error
    ("workspace under output", 3, lambda a: a[2].view(-1).view(torch.uint8), ValueError,
     r"output overlaps workspace in memory"),
]


# (op, args maker, case): every op's cases against a valid call of that op.
MAKERS = {PREFILL: _prefill, DECODE: _decode, PERSISTENT: _persistent}
REJECT_CASES = [(op, MAKERS[op], case) for op, cases in ((PREFILL, PREFILL_CASES), (DECODE, DECODE_CASES),
                                                         (PERSISTENT, PERSISTENT_CASES))
                for case in cases]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, make_args, case", REJECT_CASES, ids=[f"{op.name}-{c[0]}" for op, _, c in REJECT_CASES])
def test_rejects_before_writing(device, op, make_args, case):
    """A clear error that names the op and the argument; the output (whatever memory it is) keeps its bits."""
    _label, position, value, error, message = case
    args = make_args(device)
    args = replace_arg(args, position, value(args))
    output = args[op.arguments.index(op.written[0])]
    before = output.clone() if isinstance(output, torch.Tensor) else None
    with pytest.raises(error, match=f"{op.name}: " + message):
        op.public(*args)
    synchronize(device)
    if before is not None:
        assert_bitwise_equal(output, before, f"{op.name} output after a rejected call")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", MAKERS, ids=lambda op: op.name)
def test_base_calls_are_valid(device, op):
    """The base call of the rejection cases is accepted and right (so each case fails for its own change only)."""
    args = MAKERS[op](device)
    op.public(*args)
    synchronize(device)
    assert_reference(op, args, what=f"{op.name} base call")


@pytest.mark.parametrize("device", DEVICES)
def test_persistent_accepts_vllm_workspace(device):
    """vLLM's 1 MiB uint8 workspace and an empty one (workspace_bytes is 0 for any size)."""
    args = _persistent(device)
    args = replace_arg(args, 3, torch.empty(1 << 20, dtype=torch.uint8, device=device))
    PERSISTENT.public(*args)
    synchronize(device)
    assert_reference(PERSISTENT, args, what="1 MiB workspace")
    assert workspace_bytes(128, 163840, 2048) == 0
    ws = persistent_topk_workspace(4, 64, 8, device)
    assert ws.dtype == torch.uint8 and ws.numel() == 0 and ws.device.type == torch.device(device).type


@pytest.mark.parametrize("device", DEVICES)
def test_size_one_dimensions_accept_any_stride(device):
    """A single row or column makes that stride meaningless: vLLM's callers pass whatever torch reports."""
    one_row = replace_arg(prefill_args(torch.randn(1, 64, device=device), [0], [64], 8, poison=None), 5, 12345)
    one_column = replace_arg(prefill_args(torch.randn(4, 1, device=device), [0] * 4, [1] * 4, 8, poison=None), 6, 7)
    for what, args in (("one row, stride0 12345", one_row), ("one column, stride1 7", one_column)):
        PREFILL.public(*args)
        synchronize(device)
        assert_reference(PREFILL, args, what=what)
        assert_contract(PREFILL, args, what=what)


def _meta_args(op, rows, width):
    """A call of `op` over `rows` x `width` scores on meta tensors (validation only: nothing is allocated), k 1;
    one length tensor serves as every int argument (inputs may share memory)."""
    logits = torch.empty(rows, width, device="meta")
    lengths = torch.empty(rows, dtype=torch.int32, device="meta")
    if op is PREFILL:
        return prefill_args(logits, lengths, lengths, 1, poison=None)
    if op is DECODE:
        return decode_args(logits, 1, lengths, 1, poison=None)
    return persistent_args(logits, lengths, 1, poison=None)


@pytest.mark.parametrize("op", [PREFILL, DECODE, PERSISTENT], ids=lambda op: op.name)
def test_width_limit_on_meta(op):
    """Rows of MAX_WIDTH scores (int32 indices; the kernels' slot arithmetic needs W + 6 < 2^31) are accepted, one
    more is rejected."""
    op.public(*_meta_args(op, 1, MAX_WIDTH))
    with pytest.raises(ValueError, match=rf"{op.name}: logits has {MAX_WIDTH + 1} columns; at most {MAX_WIDTH}"):
        op.public(*_meta_args(op, 1, MAX_WIDTH + 1))


@pytest.mark.parametrize("op", [PREFILL, DECODE, PERSISTENT], ids=lambda op: op.name)
def test_row_limit_on_meta(op):
    """MAX_ROWS = 2^31 - 1 rows at most (CUDA's grid.x; a row takes one CTA or more): accepted, one more is
    rejected."""
    op.public(*_meta_args(op, MAX_ROWS, 1))
    with pytest.raises(ValueError, match=rf"{op.name}: logits has {MAX_ROWS + 1} rows; at most {MAX_ROWS}"):
        op.public(*_meta_args(op, MAX_ROWS + 1, 1))


def test_meta_tensors_validate_only():
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in _persistent("cpu"))
    PERSISTENT.public(*meta)
    with pytest.raises(ValueError, match="persistent_topk: output has 16 columns"):
        PERSISTENT.public(*replace_arg(meta, 2, torch.empty(4, 16, dtype=torch.int32, device="meta")))


def test_tensors_on_different_devices_are_rejected():
    args = _persistent("cpu")
    with pytest.raises(ValueError, match="persistent_topk: .* all tensors must be on one device"):
        PERSISTENT.public(*replace_arg(args, 3, torch.empty(0, dtype=torch.uint8, device="meta")))
