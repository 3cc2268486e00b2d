"""The guide's worked example (tests/example_op/scaled_copy.py, 47 lines) through the generic helpers: the CPU
reference and the CUDA kernel against float64, opcheck, torch.compile(fullgraph=True), CuPy arrays, validation."""

from __future__ import annotations

import pytest
import torch
from example_op.scaled_copy import OP
from helpers import DEVICES, check_call, compiled_matches_eager, gpu, opcheck, requires_cuda

from cupy_ops import testing


def _args(device, dtype=torch.float16, transposed=True, rows=37, cols=19, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(cols, rows, generator=g, device=device).to(dtype).t() if transposed else \
        torch.randn(rows, cols, generator=g, device=device).to(dtype)
    return torch.empty(rows, cols, dtype=dtype, device=device), x, 0.75


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(37, 19), (1, 1), (0, 5), (70000, 3)], ids=str)  # odd, one, empty, > 65535 rows
def test_matches_reference(device, dtype, shape):
    check_call(OP, _args(device, dtype, rows=shape[0], cols=shape[1]))


@pytest.mark.parametrize("device", DEVICES)
def test_an_in_place_call_through_the_checking_helpers(device):
    """out given as x too (an in-place call): the helpers poison outputs but not one the op reads."""
    x = _args(device, transposed=False)[1]
    check_call(OP, (x, x, 0.75))
    assert testing.check_example(OP, (x, x.clone(), 0.75)) is None
    assert testing.check_example(OP, (x, x, 0.75)) is None


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    opcheck(OP, _args(device))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    compiled_matches_eager(OP, lambda: _args(device, seed=3))


@gpu
@requires_cuda
def test_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    x = cupy.random.standard_normal((19, 37), dtype=cupy.float32).T
    out = cupy.empty((37, 19), dtype=cupy.float32)
    OP.public(out, x, 2.0)
    assert bool(cupy.allclose(out, x * 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_with_op_and_argument(device):
    out, x, scale = _args(device)
    with pytest.raises(ValueError, match=r"scaled_copy: out has shape .* expected \[rows, cols\]"):
        OP.public(out[:, :3], x, scale)
    with pytest.raises(TypeError, match=r"scaled_copy: out must be x's dtype \(float16\), got float32"):
        OP.public(out.float(), x, scale)
    with pytest.raises(TypeError, match=r"scaled_copy: scale must be a float"):
        OP.public(out, x, "2")
