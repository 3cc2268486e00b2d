"""Helpers shared by the top-k tests (top_k_per_row_prefill/decode, persistent_topk): score generators, argument
builders with poisoned tails and outputs (UNWRITTEN in every slot, so a slot the kernel skips fails the
comparison), outputs with a padded row stride, and the output contract checked independently of our reference
(torch.topk values).

The contract (specs: sampler_ops.md 2.4, persistent_topk.md 3): per row with window length L and k slots,
min(k, L) distinct indices in [0, L), then -1; the multiset of their values equals torch.topk's bit for bit (as
order keys: -0 == +0, NaN above +inf). Ours is stricter: indices ascending, ties to the lowest index, i.e. exactly
the op's reference.
"""

from __future__ import annotations

import pytest
import torch
from helpers import GUARD, assert_untouched, strided

from cupy_ops.ops import topk_rows
from cupy_ops.ops.persistent_topk import OP as PERSISTENT
from cupy_ops.ops.persistent_topk import persistent_topk_workspace
from cupy_ops.ops.top_k_per_row import DECODE, PREFILL, decode_ends
from cupy_ops.ops.topk_rows import float_keys

__all__ = ["DATA_KINDS", "DECODE", "PERSISTENT", "PREFILL", "UNWRITTEN", "PaddedOutput", "assert_contract",
           "assert_reference", "assert_vllm_agrees", "decode_args", "each_row_kernel", "make_scores",
           "persistent_args", "prefill_args", "replace_arg", "vllm_agrees", "windows_of"]

# The outputs' poison: never a legal output (indices are >= 0, absent slots -1), so every slot must be written.
UNWRITTEN = -5


@pytest.fixture(params=["buffer", "registers", "two-pass"])
def each_row_kernel(request, monkeypatch):
    """Runs a test once with each row kernel the plans choose from: topk_row (clusters, streaming, shrinks) for every
    call; the row-in-registers kernel for every call whose chunks fit it (topk_row for the others); the two-pass
    kernel for every call of contiguous rows. Plans are cached per layout: forgotten on both sides."""
    two_pass = request.param == "two-pass"
    for name in ("TWO_PASS_ROWS_PER_SM", "TWO_PASS_ROWS_PER_SM_TWO_READS"):
        monkeypatch.setattr(topk_rows, name, 0 if two_pass else 2**31)
    monkeypatch.setattr(topk_rows, "TWO_PASS_WIDTH_PER_K", 0)
    monkeypatch.setattr(topk_rows, "REGISTER_ROWS", request.param == "registers")
    for op in (PREFILL, DECODE, PERSISTENT):
        op.forget_layouts()
    yield request.param
    for op in (PREFILL, DECODE, PERSISTENT):
        op.forget_layouts()

# Score patterns: each stresses another part of the select (spec test plans).
DATA_KINDS = ("randn", "lowbits", "equal", "ties", "special", "neginf", "ascending", "descending")


def make_scores(kind: str, rows: int, width: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """float32 [rows, width] of pattern `kind`:
    randn; lowbits (0x3F900000 | 10 random bits: values within 1024 ulps of 1.125, every 8-bit radix digit but the
    last one tied); equal (all 0.5); ties (10 distinct values); special (~10% -inf, 5% +inf, 5% NaN, 40% +-0);
    neginf (all -inf but every 97th, so -inf fills the last slots); ascending / descending (0, 1, 2, ...)."""
    if kind == "lowbits":
        bits = torch.randint(0, 1024, (rows, width), generator=gen, device=device, dtype=torch.int32)
        return (bits | 0x3F900000).view(torch.float32)
    if kind == "equal":
        return torch.full((rows, width), 0.5, device=device)
    if kind == "ties":
        return torch.randint(0, 10, (rows, width), generator=gen, device=device).float()
    if kind in ("ascending", "descending"):
        ramp = torch.arange(width, device=device, dtype=torch.float32).repeat(rows, 1)
        return ramp if kind == "ascending" else -ramp
    x = torch.randn(rows, width, generator=gen, device=device)
    if kind == "special":
        r = torch.rand(rows, width, generator=gen, device=device)
        x = torch.where(r < 0.10, float("-inf"), x)
        x = torch.where((r >= 0.10) & (r < 0.15), float("inf"), x)
        x = torch.where((r >= 0.15) & (r < 0.20), float("nan"), x)
        x = torch.where((r >= 0.20) & (r < 0.40), -0.0, x)
        x = torch.where((r >= 0.40) & (r < 0.60), 0.0, x)
    elif kind == "neginf":
        x = torch.full((rows, width), float("-inf"), device=device)
        x[:, ::97] = 1.0
    elif kind != "randn":
        raise ValueError(kind)
    return x


def _poison_outside(logits: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, poison: float) -> None:
    """Write `poison` to every column of each row outside [start, start + length): the op must never read it."""
    cols = torch.arange(logits.shape[1], device=logits.device)[None, :]
    outside = (cols < starts[:, None]) | (cols >= (starts + lengths)[:, None])
    logits.masked_fill_(outside, poison)


def _poisoned(op, args: tuple, poison) -> tuple:
    """`args`, after setting the scores outside each row's (clamped) window to `poison` (None: left alone)."""
    if poison is not None:
        start, length = windows_of(op, args)
        _poison_outside(args[0], start, length, poison)
    return args


def _unwritten(rows: int, k: int, device) -> torch.Tensor:
    return torch.full((rows, k), UNWRITTEN, dtype=torch.int32, device=device)


def replace_arg(args: tuple, position: int, value) -> tuple:
    """`args` with the argument at `position` replaced by `value`."""
    return args[:position] + (value,) + args[position + 1:]


class PaddedOutput:
    """An int32 [rows, k] output whose rows are `pitch` elements apart (pitch > k: a row stride other than k) in a
    buffer with GUARD spare elements, all UNWRITTEN: the op must write every slot of the view (the reference
    comparison) and nothing of the padding columns or the guard (`assert_padding_untouched`)."""

    def __init__(self, rows: int, k: int, pitch: int, device):
        self.view, self.buffer = strided((rows, k), (pitch, 1), 0, torch.int32, device)
        self.buffer.fill_(UNWRITTEN)
        self.snapshot = self.buffer.clone()

    def into(self, op, args: tuple) -> tuple:
        """`args` of `op` writing into this output."""
        return replace_arg(args, op.arguments.index(op.written[0]), self.view)

    def assert_padding_untouched(self, what: str) -> None:
        assert_untouched(self.view, self.buffer, self.snapshot,
                         f"{what}: padding columns or the {GUARD} guard elements")


def prefill_args(logits, starts, ends, k, *, poison=float("nan")) -> tuple:
    """Positional args of top_k_per_row_prefill for `logits` [rows, W] (any view) and int lists/tensors starts/ends;
    scores outside each (clamped) window are set to `poison` first (None: left alone); indices all UNWRITTEN."""
    device = logits.device
    starts = torch.as_tensor(starts, dtype=torch.int32, device=device)
    ends = torch.as_tensor(ends, dtype=torch.int32, device=device)
    rows = logits.shape[0]
    indices = _unwritten(rows, k, device)
    return _poisoned(PREFILL, (logits, starts, ends, indices, rows, logits.stride(0), logits.stride(1), k), poison)


def decode_args(logits, next_n, seq_lens, k, *, poison=float("nan")) -> tuple:
    """Positional args of top_k_per_row_decode; `seq_lens` a list (1-D) or nested list (2-D [B, next_n])."""
    device = logits.device
    seq_lens = torch.as_tensor(seq_lens, dtype=torch.int32, device=device)
    rows = logits.shape[0]
    indices = _unwritten(rows, k, device)
    return _poisoned(DECODE, (logits, next_n, seq_lens, indices, rows, logits.stride(0), logits.stride(1), k), poison)


def persistent_args(logits, lengths, k, max_seq_len=None, *, poison=float("nan")) -> tuple:
    """Positional args of persistent_topk (max_seq_len defaults to the width)."""
    device = logits.device
    rows, width = logits.shape
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    max_seq_len = width if max_seq_len is None else max_seq_len
    output = _unwritten(rows, k, device)
    workspace = persistent_topk_workspace(rows, width, k, device)
    return _poisoned(PERSISTENT, (logits, lengths, output, workspace, k, max_seq_len), poison)


def windows_of(op, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) int64 [rows] of each row's clamped window (the ops' documented clamping)."""
    logits = args[0]
    width = logits.shape[1]
    if op is PREFILL:
        rows = args[4]
        start = args[1][:rows].to(torch.int64).clamp(0, width)
        end = torch.maximum(args[2][:rows].to(torch.int64), start).clamp(max=width)
        return start, end - start
    if op is DECODE:
        length = decode_ends(args[2], args[1], args[4]).clamp(0, width)
        return torch.zeros_like(length), length
    limit = max(0, min(args[5], width))
    length = args[1].reshape(-1).to(torch.int64).clamp(0, limit)
    return torch.zeros_like(length), length


def _topk_key_multiset(logits, start, length, k):
    """Sorted (descending) keys of torch.topk's values on each masked row, -1 for absent slots."""
    rows, width = logits.shape
    cols = torch.arange(width, device=logits.device)[None, :]
    inside = (cols >= start[:, None]) & (cols < (start + length)[:, None])
    masked = torch.where(inside, logits, torch.full_like(logits, float("-inf")))
    count = min(k, width)
    values = masked.topk(count, dim=1).values if count else masked[:, :0]
    keys = torch.where(torch.arange(count, device=logits.device)[None, :] < length[:, None],
                       float_keys(values), torch.full_like(values, -1, dtype=torch.int64))
    if count < k:
        keys = torch.cat([keys, keys.new_full((rows, k - count), -1)], dim=1)
    return keys.sort(dim=1, descending=True).values


def assert_contract(op, args, out=None, *, what="", ordered=True) -> None:
    """The output contract, checked against torch.topk values (not our reference): for each row, min(k, L) distinct
    in-window indices then -1, value keys equal to torch.topk's multiset; `ordered`: ascending indices too (ours)."""
    out = args[op.arguments.index(op.written[0])] if out is None else out
    out = out.cpu().to(torch.int64)
    logits = args[0].cpu()
    start, length = (t.cpu() for t in windows_of(op, args))
    k = out.shape[1]
    taken = torch.minimum(length, torch.tensor(k))
    slot = torch.arange(k)[None, :]
    valid = slot < taken[:, None]
    bad = (valid & ((out < 0) | (out >= length[:, None]))) | (~valid & (out != -1))
    if bool(bad.any()):
        r, j = (int(v) for v in bad.nonzero()[0])
        pytest.fail(f"{what}: row {r} slot {j} holds {int(out[r, j])}; L = {int(length[r])}, k = {k}", pytrace=False)
    if logits.shape[1] == 0:
        return  # no columns: every slot is -1, checked above
    picked = torch.where(valid, out, torch.zeros_like(out))
    if ordered:
        step = picked[:, 1:] - picked[:, :-1]
        unordered = valid[:, 1:] & (step <= 0)
    else:
        s = torch.where(valid, out, torch.full_like(out, 2**40)).sort(dim=1).values
        unordered = valid[:, 1:] & (s[:, 1:] == s[:, :-1])
    if bool(unordered.any()):
        r = int(unordered.nonzero()[0, 0])
        pytest.fail(f"{what}: row {r} has {'unordered or ' if ordered else ''}repeated indices: {out[r, :16].tolist()}",
                    pytrace=False)
    columns = (picked + start[:, None]).clamp(0, max(logits.shape[1] - 1, 0))
    got = torch.where(valid, float_keys(logits.gather(1, columns)), torch.full_like(out, -1))
    got = got.sort(dim=1, descending=True).values
    want = _topk_key_multiset(logits, start, length, k)
    differ = (got != want).any(dim=1)
    if bool(differ.any()):
        r = int(differ.nonzero()[0, 0])
        pytest.fail(f"{what}: row {r} (L = {int(length[r])}) selects other values than torch.topk "
                    f"({int(differ.sum())} rows differ)", pytrace=False)


def assert_reference(op, args, *, what="") -> None:
    """The written output equals the op's reference exactly (our deterministic order and tie rule)."""
    out = args[op.arguments.index(op.written[0])]
    want = op.reference(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])[0]
    got = out.cpu()
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        r = int(bad[0, 0])
        pytest.fail(f"{what}: {len(bad)} slots differ from the reference; row {r}: got {got[r, :12].tolist()}, "
                    f"expected {want[r, :12].tolist()}", pytrace=False)


def vllm_agrees(op, args, vllm_out: torch.Tensor) -> torch.Tensor:
    """bool [rows]: rows where vLLM's output satisfies the contract (any order, any tie choice) and so must agree
    with ours up to order and ties: for those rows both select the same value multiset."""
    out = vllm_out.cpu().to(torch.int64)
    logits = args[0].cpu()
    start, length = (t.cpu() for t in windows_of(op, args))
    k = out.shape[1]
    valid = torch.arange(k)[None, :] < torch.minimum(length, torch.tensor(k))[:, None]
    in_range = torch.where(valid, (out >= 0) & (out < length[:, None]), out == -1).all(dim=1)
    s = torch.where(valid, out, torch.full_like(out, 2**40)).sort(dim=1).values
    distinct = ~(valid[:, 1:] & (s[:, 1:] == s[:, :-1])).any(dim=1)
    columns = (torch.where(valid, out, torch.zeros_like(out)).clamp(min=0) + start[:, None]).clamp(
        max=max(logits.shape[1] - 1, 0))
    got = torch.where(valid, float_keys(logits.gather(1, columns)), torch.full_like(out, -1))
    same = (got.sort(dim=1, descending=True).values == _topk_key_multiset(logits, start, length, k)).all(dim=1)
    return in_range & distinct & same


def assert_vllm_agrees(op, args, vllm_out: torch.Tensor, *, exact: bool) -> None:
    """`exact` (data without ties): every row of vLLM's output on `args` is a valid top-k (vllm_agrees) with the
    index set of ours (already written into `args`). With ties, vLLM's rows may differ by its tie choice."""
    valid = vllm_agrees(op, args, vllm_out)
    if exact:
        ours = args[op.arguments.index(op.written[0])]
        assert bool(valid.all()), f"vLLM rows {(~valid).nonzero().flatten().tolist()} are not a valid top-k"
        assert torch.equal(vllm_out.sort(dim=1).values, ours.sort(dim=1).values)
