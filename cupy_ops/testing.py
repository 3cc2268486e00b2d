"""Comparison helpers shared by the self-check (`python -m cupy_ops check`), the tests and the benchmarks."""

from __future__ import annotations

import torch

# (rtol, atol) for a result rounded to `dtype`, against a float64 reference: a couple of ulps of the output
# dtype on top of float32 arithmetic. fp8 e4m3 has 3 mantissa bits: one ulp is 12.5% relative.
TOLERANCE = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-4),
    torch.float8_e4m3fn: (1.25e-1, 2e-3),
}


def mismatch(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> str | None:
    """None when `actual` matches `expected` within TOLERANCE[dtype] (NaN only where expected has NaN), else
    a message with the count of bad elements and the first bad indices."""
    rtol, atol = TOLERANCE[dtype or actual.dtype]
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    close = torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bool(close.all()):
        return None
    bad = (~close).nonzero()
    first = [tuple(i.tolist()) for i in bad[:5]]
    return (f"{bad.shape[0]} of {a.numel()} elements differ (rtol={rtol}, atol={atol}); first at {first}: "
            f"got {[a[i].item() for i in first]}, expected {[e[i].item() for i in first]}")
