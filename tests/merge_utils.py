"""merge_attn_states test data: named strided layouts, random inputs with +-inf lse, one call's arguments
(`MergeCase`) and its check against the float64 reference, and an independent attention model. Generic helpers
(marks, comparisons, poison, guarded views) are in helpers.py.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from helpers import (DEVICES, FP8, assert_bitwise_equal, assert_close, assert_untouched,  # noqa: F401
                     gpu, poison_, requires_cuda, strided, synchronize)

import cupy_ops

# Output kinds by name: (input dtype, fp8 output). Each input dtype to itself and to fp8 (the fp8 conversion runs
# per input dtype); test grids pick the subset they need with `kinds`.
OUTPUT_KINDS = {
    "float32": (torch.float32, False), "float16": (torch.float16, False), "bfloat16": (torch.bfloat16, False),
    "float32-to-fp8": (torch.float32, True), "float16-to-fp8": (torch.float16, True),
    "bfloat16-to-fp8": (torch.bfloat16, True),
}


def kinds(*names: str) -> dict[str, tuple[torch.dtype, bool]]:
    return {name: OUTPUT_KINDS[name] for name in names}


NHD = ("output", "prefix_output", "suffix_output")  # [n, h, d] tensors
HN = ("output_lse", "prefix_lse", "suffix_lse")     # [h, n] tensors


# Named layouts, each as (strides, element offset) per tensor. Why each exists:
# - contiguous: the usual call, widest vectors.
# - head_slice: output / output_lse are heads [2, 2 + h) of buffers with h + 3 heads, so the token stride is not
#   h * head stride (vLLM assumed it was) and the pointer sits past the buffer start.
# - padded: every tensor its own head and token padding (vLLM read the suffix with the prefix's strides); head
#   strides are multiples of 8, so a head size that is not gets vector accesses plus a scalar tail.
# - head_major: [h, n, d] buffers seen as [n, h, d] and lse tensors as transposed views of [n, h] buffers.
# - offset1 / offset2 / offset4: all tensors at that element offset: 1 forces one-element accesses, 2 and 4 the
#   middle vector widths (vLLM required 16-byte alignment and crashed with "misaligned address").
# - offset_mixed: only the output is misaligned, so one tensor alone must narrow the vector.
LAYOUTS = ("contiguous", "head_slice", "padded", "head_major", "offset1", "offset2", "offset4", "offset_mixed")


def layout_strides(layout: str, n: int, h: int, d: int) -> dict[str, tuple[tuple[int, ...], int]]:
    # Contiguous strides as torch.empty gives them: empty dims count as 1, so no stride is 0.
    nhd = (max(h, 1) * max(d, 1), max(d, 1), 1)
    hn = (max(n, 1), 1)
    spec = {name: (nhd, 0) for name in NHD}
    spec.update({name: (hn, 0) for name in HN})
    if layout == "head_slice":
        spec["output"] = (((h + 3) * d, d, 1), 2 * d)
        spec["output_lse"] = (hn, 2 * n)
    elif layout == "padded":
        rounded = -(-d // 8) * 8  # 16-byte rows for 16-bit types: a vector body, then a ragged tail when 8 ∤ d
        for name, pad in zip(NHD, (16, 8, 24)):
            spec[name] = ((h * (rounded + pad) + 8, rounded + pad, 1), 0)
        for name, pad in zip(HN, (3, 5, 9)):
            spec[name] = ((n + pad, 1), 0)
    elif layout == "head_major":
        spec.update({name: ((d, n * d, 1), 0) for name in NHD})
        spec.update({name: ((1, h), 0) for name in HN})
    elif layout.startswith("offset"):
        offsets = (1, 0, 0) if layout == "offset_mixed" else (int(layout[len("offset"):]),) * 3
        spec.update({name: (nhd, k) for name, k in zip(NHD, offsets)})
        spec.update({name: (hn, k) for name, k in zip(HN, offsets)})
    elif layout != "contiguous":
        raise ValueError(layout)
    return spec


# ---- inputs -------------------------------------------------------------------------------------------------


def random_lse(h: int, n: int, generator: torch.Generator, device, kind: str = "mixed"):
    """(prefix_lse, suffix_lse), float32 [h, n], natural-log scale ~ N(0, 3).

    kind "mixed": ~10% of (head, token) pairs have an empty prefix (+-inf, random sign), ~10% an empty suffix,
    ~10% both; ~5% are ties (equal lse), ~5% are large (~200, where exp without the max shift overflows)."""
    prefix = torch.randn(h, n, generator=generator, device=device) * 3
    suffix = torch.randn(h, n, generator=generator, device=device) * 3
    if kind == "finite":
        return prefix, suffix
    u = torch.rand(h, n, generator=generator, device=device)
    inf = torch.where(torch.rand(h, n, generator=generator, device=device) < 0.5, math.inf, -math.inf)
    inf2 = torch.where(torch.rand(h, n, generator=generator, device=device) < 0.5, math.inf, -math.inf)
    suffix = torch.where((u >= 0.30) & (u < 0.35), prefix, suffix)
    large = (u >= 0.35) & (u < 0.40)
    prefix, suffix = torch.where(large, prefix + 200, prefix), torch.where(large, suffix + 200, suffix)
    prefix = torch.where((u < 0.1) | ((u >= 0.2) & (u < 0.3)), inf, prefix)
    suffix = torch.where((u >= 0.1) & (u < 0.3), inf2, suffix)
    return prefix, suffix


@dataclasses.dataclass
class MergeCase:
    """One call's arguments; `outputs` holds (view, buffer, name) for the written tensors."""

    output: torch.Tensor
    output_lse: torch.Tensor | None
    prefix_output: torch.Tensor
    prefix_lse: torch.Tensor
    suffix_output: torch.Tensor
    suffix_lse: torch.Tensor
    p: int | None
    output_scale: torch.Tensor | None
    outputs: list

    @property
    def p_value(self) -> int:
        return self.prefix_output.shape[0] if self.p is None else self.p

    def args(self) -> tuple:
        return (self.output, self.output_lse, self.prefix_output, self.prefix_lse, self.suffix_output,
                self.suffix_lse, self.p, self.output_scale)

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64-math reference: (output, output_lse), output_lse computed even when the call has none."""
        output_lse = self.output_lse if self.output_lse is not None else torch.empty(0)
        return cupy_ops.merge_attn_states_ref(self.output, output_lse, self.prefix_output, self.prefix_lse,
                                              self.suffix_output, self.suffix_lse, self.p, self.output_scale,
                                              compute_dtype=torch.float64)


def make_case(n: int, h: int, d: int, dtype: torch.dtype, device, *, fp8: bool = False, p: int | None = None,
              with_output_lse: bool = True, layout: str = "contiguous", lse: str = "mixed", seed: int = 0,
              scale: float = 0.02) -> MergeCase:
    """Random inputs in `layout`; input buffers hold NaN outside their views, so a mis-addressed read shows.

    fp8: the output is float8_e4m3fn with output_scale `scale` (0.02 puts ~N(0,1) values near +-50 and lets
    large ones reach the +-448 clamp)."""
    g = torch.Generator(device=device).manual_seed(seed)
    spec = layout_strides(layout, n, h, d)
    prefix_lse_values, suffix_lse_values = random_lse(h, n, g, device, lse)
    values = {
        "prefix_output": torch.randn(n, h, d, generator=g, device=device).to(dtype),
        "suffix_output": torch.randn(n, h, d, generator=g, device=device).to(dtype),
        "prefix_lse": prefix_lse_values,
        "suffix_lse": suffix_lse_values,
    }
    tensors = {}
    for name, value in values.items():
        view, buffer = strided(value.shape, *spec[name], value.dtype, device)
        buffer.fill_(float("nan"))
        view.copy_(value)
        tensors[name] = view
    outputs = []
    out, out_buffer = strided((n, h, d), *spec["output"], FP8 if fp8 else dtype, device)
    outputs.append((out, out_buffer, "output"))
    out_lse = None
    if with_output_lse:
        out_lse, lse_buffer = strided((h, n), *spec["output_lse"], torch.float32, device)
        outputs.append((out_lse, lse_buffer, "output_lse"))
    output_scale = torch.tensor([scale], device=device) if fp8 else None
    return MergeCase(out, out_lse, tensors["prefix_output"], tensors["prefix_lse"], tensors["suffix_output"],
                     tensors["suffix_lse"], p, output_scale, outputs)


def check_outputs(case: MergeCase, expected_out: torch.Tensor, expected_lse: torch.Tensor) -> None:
    """Merged tokens within tolerance of the reference; tokens t >= p bit-exact copies of the suffix (fp8: within
    one ulp of the scaled suffix), output_lse there bit-exact suffix_lse (+inf stays +inf)."""
    p = case.p_value
    fp8 = case.output.dtype == FP8
    assert_close(case.output[:p], expected_out[:p], "output, tokens with context", scale=case.output_scale)
    if fp8:
        assert_close(case.output[p:], expected_out[p:], "output, tokens without context",
                             scale=case.output_scale)
    else:
        assert_bitwise_equal(case.output[p:], case.suffix_output[p:], "output, tokens without context")
    if case.output_lse is not None:
        assert_close(case.output_lse[:, :p], expected_lse[:, :p], "output_lse, tokens with context")
        assert_bitwise_equal(case.output_lse[:, p:], case.suffix_lse[:, p:], "output_lse, tokens without context")


def run_and_check(case: MergeCase, entry=None, *, finite_poison: bool = False) -> None:
    """Poison the output buffers, run the op, compare with the float64 reference, check the guards."""
    expected_out, expected_lse = case.reference()
    snapshots = []
    for view, buffer, name in case.outputs:
        poison_(buffer, finite=finite_poison)
        snapshots.append(buffer.clone())
    (entry or cupy_ops.merge_attn_states)(*case.args())
    synchronize(case.output.device)
    check_outputs(case, expected_out, expected_lse)
    for (view, buffer, name), snapshot in zip(case.outputs, snapshots):
        assert_untouched(view, buffer, snapshot, name)


# ---- an independent model: attention over two disjoint key sets -------------------------------------------


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
    """Softmax attention of q [n, h, e] over keys k [m, h, e] and values v [m, h, d] where mask [n, h, m] holds.

    Returns (out [n, h, d], lse [h, n]) in q's dtype; a (token, head) with no keys gets zeros and lse -inf."""
    scores = torch.einsum("the,mhe->thm", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(nan=0.0)  # -inf - -inf on rows without keys
    return torch.einsum("thm,mhd->thd", weights, v), lse.transpose(0, 1).contiguous()
