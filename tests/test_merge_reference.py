"""merge_attn_states_ref (the pure-torch reference, also the CPU kernel): float32 math against float64, and the
merge against an independent model, real attention split over two disjoint key sets."""

from __future__ import annotations

import math

import pytest
import torch
from merge_utils import (
    DEVICES,
    FP8,
    assert_bitwise_equal,
    assert_close,
    attention_with_lse,
    kinds,
    make_case,
    synchronize,
)

import cupy_ops

# Output kinds: each input dtype with its own output, plus fp8 output from a 16-bit and from a 32-bit input.
OUTPUT_KINDS = kinds("float32", "float16", "bfloat16", "bfloat16-to-fp8", "float32-to-fp8")


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
@pytest.mark.parametrize("p_kind", ["none", "zero", "half", "all"])
def test_reference_float32_math_matches_float64(kind, p_kind):
    """The float32 reference (what the kernel computes) stays within the tolerance table of float64 math, with
    +-inf, tied and large lse values mixed in; tokens t >= p are copies in both."""
    dtype, fp8 = OUTPUT_KINDS[kind]
    n, h, d = 37, 5, 24  # odd token and head counts; small, since this is pure torch on the CPU
    p = {"none": None, "zero": 0, "half": n // 2, "all": n}[p_kind]
    case = make_case(n, h, d, dtype, "cpu", fp8=fp8, p=p, seed=11)
    args = case.args()
    out32, lse32 = cupy_ops.merge_attn_states_ref(*args, compute_dtype=torch.float32)
    out64, lse64 = cupy_ops.merge_attn_states_ref(*args, compute_dtype=torch.float64)
    assert out64.dtype == (FP8 if fp8 else dtype) and lse64.dtype == torch.float32
    assert_close(out32, out64, "output", scale=case.output_scale)
    assert_close(lse32, lse64, "output_lse")
    q = case.p_value
    if not fp8:
        assert_bitwise_equal(out64[q:], case.suffix_output[q:], "float64 reference, tokens without context")
    assert_bitwise_equal(lse64[:, q:], case.suffix_lse[:, q:], "float64 reference lse, tokens without context")


def _split_attention(seed: int, device):
    """Attention of 9 tokens x 4 heads over 20 keys, split per (token, head) at a random key into a prefix and a
    suffix set, with 20% of keys masked out. Forced rows: (0, 0) has no prefix key, (1, 1) no suffix key, (2, 2)
    no key at all. Returns float64 (prefix out, prefix lse, suffix out, suffix lse, full out, full lse)."""
    n, h, e, m, d = 9, 4, 16, 20, 12
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, h, e, generator=g, device=device, dtype=torch.float64)
    k = torch.randn(m, h, e, generator=g, device=device, dtype=torch.float64) * 2
    v = torch.randn(m, h, d, generator=g, device=device, dtype=torch.float64)
    cut = torch.randint(0, m + 1, (n, h, 1), generator=g, device=device)
    keep = torch.rand(n, h, m, generator=g, device=device) >= 0.2
    cut[0, 0], cut[1, 1] = 0, m
    keep[2, 2] = False
    keys = torch.arange(m, device=device)
    prefix_mask, suffix_mask = keep & (keys < cut), keep & (keys >= cut)
    return (*attention_with_lse(q, k, v, prefix_mask), *attention_with_lse(q, k, v, suffix_mask),
            *attention_with_lse(q, k, v, prefix_mask | suffix_mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("empty_lse", [-math.inf, math.inf], ids=["empty-is-minus-inf", "empty-is-plus-inf"])
def test_merge_equals_attention_over_all_keys(device, empty_lse):
    """Merging the two halves of a split attention gives attention over all keys, lse included; a side without
    keys (lse -inf, or +inf as some backends write it) contributes nothing; no keys at all gives zeros, -inf."""
    po, pl, so, sl, full, full_lse = _split_attention(seed=5, device=device)
    assert bool((pl == -math.inf).any()) and bool((sl == -math.inf).any())  # the forced empty sides exist
    pl = torch.where(pl == -math.inf, empty_lse, pl)
    sl = torch.where(sl == -math.inf, empty_lse, sl)

    out64, lse64 = cupy_ops.merge_attn_states_ref(torch.empty_like(po), torch.empty_like(pl), po, pl.float(), so,
                                                  sl.float(), compute_dtype=torch.float64)
    # float64 math on float32 lse: the lse rounding (~1e-7 relative) bounds the agreement, not float64 eps.
    torch.testing.assert_close(out64, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse64, full_lse.float(), rtol=1e-6, atol=1e-6)

    # The op itself (the CPU reference kernel or the CUDA kernel) in float32.
    n, h, d = full.shape
    out = torch.full((n, h, d), float("nan"), device=device)
    out_lse = torch.full((h, n), float("nan"), device=device)
    cupy_ops.merge_attn_states(out, out_lse, po.float(), pl.float(), so.float(), sl.float())
    synchronize(device)
    assert_close(out, full.float(), "output against attention over all keys")
    assert_close(out_lse, full_lse.float(), "output_lse against attention over all keys")
