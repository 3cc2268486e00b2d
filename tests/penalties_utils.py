"""apply_repetition_penalties_'s test data and checks, shared by its GPU/CPU tests and its CPU emulation: random
calls, the mask and logits layouts the plan distinguishes, the special values, and the bit-exact comparison with
the float32 reference."""

from __future__ import annotations

import torch
from helpers import assert_bitwise_equal, bits, synchronize

import cupy_ops
from cupy_ops.ops.apply_repetition_penalties_ import OP

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def penalty_args(device, dtype=torch.float32, rows=5, vocab=1019, *, density=0.05, penalty_dtype=None,
                 seed=0) -> tuple:
    """(logits [rows, vocab] N(0, 1), prompt_mask, output_mask [rows, vocab] bool at `density`, penalties [rows]
    in [0.5, 2) of `penalty_dtype` (default: logits' dtype, as vLLM passes them))."""
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g, device=device).to(dtype)
    prompt, output = (torch.rand(rows, vocab, generator=g, device=device) < density for _ in range(2))
    penalties = (torch.rand(rows, generator=g, device=device) * 1.5 + 0.5).to(penalty_dtype or dtype)
    return logits, prompt, output, penalties


def special_value_args(device, dtype, penalty_dtype) -> tuple:
    """+-0, +-inf, NaN, subnormals, the largest finite value and 1 in every row; penalties below and above 1,
    exactly 1, tiny (x / p overflows) and huge (x * p overflows; x / p underflows); every token of the row set
    in the prompt mask only, the output mask only, both or neither (4 columns per value)."""
    info = torch.finfo(dtype)
    values = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), info.smallest_normal / 4,
                           -info.smallest_normal / 4, info.max, -info.max, 1.0, -1.0, 3.0, -0.5],
                          dtype=torch.float64)
    penalties = torch.tensor([1.2, 0.8, 1.0, 1e-30, 1e30, 2.0 ** -10], dtype=torch.float64)
    rows, vocab = len(penalties), 4 * len(values)
    logits = values.repeat_interleave(4).expand(rows, vocab).to(dtype).to(device).contiguous()
    which = torch.arange(vocab) % 4  # 0 neither, 1 prompt only, 2 output only, 3 both
    prompt = ((which == 1) | (which == 3)).expand(rows, vocab).to(device).contiguous()
    output = ((which == 2) | (which == 3)).expand(rows, vocab).to(device).contiguous()
    return logits, prompt, output, penalties.to(penalty_dtype).to(device)


# Masks cut out of wider buffers: (prompt start, output start, prompt row padding, output row padding), in bytes.
# The kernel's mask vectors are W bytes, the widest W at which both masks' rows are congruent mod W:
MASK_LAYOUTS = {
    "contiguous": (0, 0, 0, 0),            # W = 16; odd vocabs cut the first and last vector of a row
    "both-start-3": (3, 3, 0, 0),          # W = 16, every row starts 3 bytes into a vector
    "both-padded-5": (0, 0, 5, 5),         # W = 16, each row starts at another offset mod 16
    "start-8-apart": (8, 0, 0, 0),         # W = 8
    "start-4-apart": (4, 0, 0, 0),         # W = 4
    "start-2-apart": (6, 0, 0, 0),         # W = 2
    "start-1-apart": (1, 0, 0, 0),         # W = 1
    "rows-4-apart": (0, 0, 4, 0),          # W = 4 from the row strides alone
    "rows-odd-apart": (7, 2, 3, 6),        # W = 1
}


def sliced_mask(mask: torch.Tensor, start: int, pad: int) -> torch.Tensor:
    """`mask`'s values in a view `start` bytes into rows `pad` bytes wider than the mask's."""
    rows, vocab = mask.shape
    buffer = torch.zeros(rows, vocab + start + pad, dtype=torch.bool, device=mask.device)
    buffer[:, start:start + vocab] = mask
    return buffer[:, start:start + vocab]


def with_mask_layout(args: tuple, layout: str) -> tuple:
    """`args` with both masks moved into MASK_LAYOUTS[layout]."""
    p_start, o_start, p_pad, o_pad = MASK_LAYOUTS[layout]
    logits, prompt, output, penalties = args
    return logits, sliced_mask(prompt, p_start, p_pad), sliced_mask(output, o_start, o_pad), penalties


# logits layouts as (strides, element offset) for [rows, vocab] = [n, 1019], n <= 6: row padding (vLLM needs
# contiguous logits), a transposed buffer, every other column.
LOGITS_LAYOUTS = {
    "row-padded": ((1024 + 3, 1), 5),
    "transposed": ((1, 6), 0),
    "every-other-column": ((2 * 1019 + 1, 2), 1),
}


def expected_fp32(args: tuple) -> torch.Tensor:
    return OP.reference(*args)[0]


def assert_matches_fp32_reference(args: tuple, expected: torch.Tensor, what: str) -> None:
    """Bit-exact with the float32 reference, except that a penalised NaN may come back as another NaN (the GPU
    returns its canonical NaN from x * p); unpenalised elements keep their bits, NaN payloads included."""
    got = args[0]
    synchronize(got.device)
    penalised = (args[1] | args[2]) & expected.isnan()
    same = (bits(got) == bits(expected)) | (penalised & got.isnan())
    if not bool(same.all()):
        assert_bitwise_equal(torch.where(same, expected, got), expected, what)


def call_and_check(args: tuple, what: str, entry=None) -> None:
    """`entry` (default: the public op) on `args`, then the bit-exact comparison."""
    expected = expected_fp32(args)
    (entry or cupy_ops.apply_repetition_penalties_)(*args)
    assert_matches_fp32_reference(args, expected, what)


__all__ = ["DTYPES", "LOGITS_LAYOUTS", "MASK_LAYOUTS", "assert_matches_fp32_reference", "call_and_check",
           "expected_fp32", "penalty_args", "sliced_mask", "special_value_args", "with_mask_layout"]
