"""scaled_copy(Tensor! out, Tensor x, float scale): out = x * scale, 2-D, any strides; fp32, fp16 or bf16.

The worked example of docs/adding-an-op.md: everything particular to an op, and nothing else. It registers
`torch.ops.cupy_ops_example.scaled_copy` (not part of the package: tests import it)."""

from __future__ import annotations

from pathlib import Path

import torch

from cupy_ops._runtime import Call, Kernel, Launch, LaunchConfig, Op, TensorArg
from cupy_ops._runtime import params as P

DTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
KERNELS = {dtype: Kernel("scaled_copy.cu", f"cupy_ops_example::scaled_copy_kernel<{name}>",
                         root=Path(__file__).parent) for dtype, name in DTYPES.items()}
PARAMS = P.CStruct("ScaledCopyParams", [
    P.ptr("out"), P.ptr("x"), P.i64("rows"), P.i64("cols"), P.i64("out_stride", 2), P.i64("x_stride", 2),
    P.f32("scale"),
])


def plan(c: Call) -> list:
    rows, cols = c.dims["rows"], c.dims["cols"]
    block = (min(cols, 128) or 1, max(1, 128 // max(cols, 1)), 1)
    grid = (-(-cols // block[0]), min(-(-rows // block[1]), 65535), 1)
    return [Launch(KERNELS[c.x.dtype], LaunchConfig(grid, block), PARAMS,
                   dict(rows=rows, cols=cols, out_stride=c.out.strides, x_stride=c.x.strides, scale=c.scale))]


def scaled_copy_ref(out, x, scale, *, compute_dtype=torch.float32):
    """(new out,): x * scale in `compute_dtype`, rounded to out's dtype."""
    return ((x.to(compute_dtype) * torch.tensor(scale, dtype=torch.float32).to(compute_dtype)).to(out.dtype),)


def examples(device: str) -> list:
    x = torch.randn(37, 19, device=device)
    return [("fp32 transposed", (torch.empty(19, 37, device=device), x.t(), 0.5))]


OP = Op("scaled_copy(Tensor! out, Tensor x, float scale) -> ()",
        tensors=[TensorArg("x", "in", ("rows", "cols"), tuple(DTYPES)),
                 TensorArg("out", "out", ("rows", "cols"), "x", may_alias=("x",))],
        kernels=KERNELS.values(), params=PARAMS, plan=plan, reference=scaled_copy_ref, examples=examples,
        namespace="cupy_ops_example", doc=__doc__)
scaled_copy = OP.public
