"""Helpers of the selective_scan_fwd tests: one call checked against the float64 reference with the scan's error
bound, and argument positions by name.

Error bound (mamba's practice): an output element passes when it is within cupy_ops.testing.TOLERANCE of the
float64 reference, or, for float32 outputs, within 4x the largest error of the float32 reference itself (torch's
own error at that precision: after thousands of tokens a float32 scan drifts by more than a few ulps of the
result, and a parallel scan's rounding order differs from the sequential one's). 16-bit outputs are rounded
from float32 math, so TOLERANCE (one ulp) holds for them. NaN must match NaN.
"""

from __future__ import annotations

import pytest
import torch
from helpers import synchronize

from cupy_ops import testing
from cupy_ops.ops.selective_scan_fwd import OP

ARG = {name: i for i, name in enumerate(OP.arguments)}
# (argument, index of its new value in the reference's results)
OUTPUTS = (("delta", 1), ("z_", 5), ("ssm_states", 6))
BOUND_FACTOR = 4.0


def clone_args(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def with_args(args: tuple, **changes) -> tuple:
    out = list(args)
    for name, value in changes.items():
        out[ARG[name]] = value
    return tuple(out)


def scan_problem(got: torch.Tensor, gold: torch.Tensor, ref32: torch.Tensor) -> str | None:
    """What is wrong with `got` against the float64 `gold` (None when it passes the bound above)."""
    if got.shape != gold.shape or got.dtype != gold.dtype:
        return f"got {got.dtype} {tuple(got.shape)}, expected {gold.dtype} {tuple(gold.shape)}"
    a, e, r = (t.detach().cpu().to(torch.float64) for t in (got, gold, ref32))
    rtol, atol = testing.TOLERANCE[got.dtype]
    bound = 0.0
    if got.dtype == torch.float32 and e.numel():
        bound = BOUND_FACTOR * float(torch.where(e.isnan() & r.isnan(), 0.0, (r - e).abs()).nan_to_num(0).max())
    err = (a - e).abs()
    bad = (a.isnan() != e.isnan()) | (~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True) & (err > bound))
    if not bool(bad.any()):
        return None
    return f"{testing.first_differences(bad, a, e)} (rtol={rtol}, atol={atol}, float32 bound={bound:g})"


def run_and_check(args: tuple, entry=None, what: str = "") -> tuple:
    """Call the op (`entry`, default the public function) on `args` and compare delta, z and ssm_states with the
    float64 reference; returns (gold, the float32 reference's results)."""
    gold = OP.reference(*args, compute_dtype=torch.float64)
    ref32 = OP.reference(*args)
    (entry or OP.public)(*args)
    synchronize(args[0].device)
    for name, k in OUTPUTS:
        got = args[ARG[name]]
        if got is None:
            continue
        problem = scan_problem(got, gold[k], ref32[k])
        if problem:
            pytest.fail(f"selective_scan_fwd{' ' + what if what else ''}: {name}: {problem}", pytrace=False)
    return gold, ref32
