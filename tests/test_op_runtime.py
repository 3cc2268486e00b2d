"""The op runtime's own rules, on the example op and on toy declarations (CPU only): binding, meta tensors,
declaration errors, and what a plan may launch. Validation and caching on real ops are in their own tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from example_op.scaled_copy import KERNELS, OP, PARAMS

from cupy_ops._runtime import Launch, LaunchConfig, Op, TensorArg


def test_keywords_positional_and_missing_arguments():
    x = torch.randn(3, 4)
    out = torch.empty(3, 4)
    OP.public(out=out, x=x, scale=2.0)
    torch.testing.assert_close(out, x * 2)
    with pytest.raises(TypeError, match=r"^scaled_copy: missing argument 'scale'"):
        OP.public(out, x)
    with pytest.raises(TypeError, match=r"^scaled_copy: got unexpected or repeated arguments \['bias'\]"):
        OP.public(out, x, 2.0, bias=1.0)
    with pytest.raises(TypeError, match=r"^scaled_copy: takes 3 arguments, got 4"):
        OP.public(out, x, 2.0, 1.0)


def test_outputs_get_no_autograd_history_on_the_cpu():
    """The CPU path copies the reference's result into the outputs without recording it (the kernels write raw
    memory): an input that requires grad leaves the output a plain tensor, on every path."""
    x = torch.randn(3, 4, requires_grad=True)
    for call in (OP.public, torch.ops.cupy_ops_example.scaled_copy):
        out = torch.empty(3, 4)
        call(out, x, 2.0)
        assert out.grad_fn is None and not out.requires_grad
        torch.testing.assert_close(out, x.detach() * 2)


@pytest.mark.parametrize("out_part, x_part, overlaps", [
    ((slice(None), slice(0, 4)), (slice(None), slice(4, 8)), False),    # a row's halves (xz.chunk(2, dim=1))
    ((slice(None), slice(0, None, 2)), (slice(None), slice(1, None, 2)), False),  # interleaved columns
    ((slice(None), slice(0, 4)), (slice(None), slice(2, 6)), True),     # columns 2 and 3 in both
    ((slice(0, 2), slice(0, 4)), (slice(1, 3), slice(4, 8)), False),    # rows overlap, columns do not
])
def test_views_of_one_buffer_overlap_only_when_they_share_an_element(out_part, x_part, overlaps):
    """Written tensors are checked element by element against the others (spans of interleaved views overlap
    although no element is shared)."""
    buffer = torch.randn(4, 8)
    out, x = buffer[out_part], buffer[x_part]
    if overlaps:
        with pytest.raises(ValueError, match=r"^scaled_copy: out partially overlaps x in memory"):
            OP.public(out, x, 2.0)
        return
    want = x * 2
    OP.public(out, x, 2.0)
    torch.testing.assert_close(out, want)


def test_meta_tensors_are_validated_and_nothing_is_computed():
    """The one rule for meta tensors outside torch.compile: all on meta is validation only (as torch's meta
    kernels); meta mixed with another device is the usual device error."""
    OP.public(torch.empty(3, 4, device="meta"), torch.empty(3, 4, device="meta"), 2.0)
    with pytest.raises(ValueError, match=r"scaled_copy: out has shape \(3, 5\)"):
        OP.public(torch.empty(3, 5, device="meta"), torch.empty(3, 4, device="meta"), 2.0)
    with pytest.raises(ValueError, match=r"scaled_copy: out is on meta but x is on cpu"):
        OP.public(torch.empty(3, 4, device="meta"), torch.randn(3, 4), 2.0)


def test_an_in_place_call_is_allowed_and_a_partial_overlap_is_not():
    x = torch.randn(4, 4)
    want = x * 3
    OP.public(x, x, 3.0)
    torch.testing.assert_close(x, want)
    buffer = torch.randn(5, 4)
    with pytest.raises(ValueError, match="scaled_copy: out partially overlaps x in memory"):
        OP.public(buffer[1:], buffer[:4], 3.0)


def _declare(schema, tensors, **changes):
    fields = dict(tensors=tensors, kernels=KERNELS.values(), params=PARAMS, plan=lambda c: [],
                  reference=lambda *a, **k: (None,), namespace="cupy_ops_test_declarations")
    fields.update(changes)
    return Op(schema, **fields)


@pytest.mark.parametrize("schema, tensors, message", [
    ("bad_a(Tensor! out, Tensor x) -> ()", [TensorArg("out", "out")], "must be the schema's tensors"),
    ("bad_c(Tensor! out, Tensor x) -> ()", [TensorArg("out", "out"), TensorArg("x", "out")], "roles"),
    ("bad_d(Tensor! out, Tensor device) -> ()", [TensorArg("out", "out"), TensorArg("device", "in")],
     "taken by `Call`"),
    # a symbol is a name bound to one size: '...' and '2*d' would be taken as names, silently (a guide trial did)
    ("bad_e(Tensor! out, Tensor x) -> ()", [TensorArg("out", "out", ("n",)), TensorArg("x", "in", ("...", "2*d"))],
     r"bad_e: x's shape entries \['...', '2\*d'\] are neither symbol names nor sizes"),
    ("bad_f(Tensor! out, Tensor x) -> ()", [TensorArg("out", "out", (-1,)), TensorArg("x")],
     r"bad_f: out's shape entries \[-1\]"),
])
def test_declarations_must_match_the_schema(schema, tensors, message):
    with pytest.raises(ValueError, match=message):
        _declare(schema, tensors)


def test_a_plan_may_only_launch_listed_kernels():
    """Warm-up and the compile tests read `kernels`: a plan launching anything else is a bug, said at once."""
    stray = type(KERNELS[torch.float32])("scaled_copy.cu", "stray<float>")
    op = _declare("stray_plan(Tensor! out, Tensor x) -> ()", [TensorArg("x", "in", ("n",)),
                                                             TensorArg("out", "out", ("n",))],
                  plan=lambda c: [Launch(stray, LaunchConfig((1, 1, 1), (32, 1, 1)), PARAMS, {})])
    call, infos = op.validate((torch.empty(4), torch.empty(4)))
    with pytest.raises(RuntimeError, match="does not list in `kernels`"):
        op._layout(call, infos, (torch.empty(4), torch.empty(4)))


def _grid_plan(grid, rows=1, scale=1.0):
    return lambda c: [Launch(KERNELS[torch.float32], LaunchConfig(grid, (32, 1, 1)), PARAMS,
                             dict(rows=rows, cols=4, out_stride=(4, 1), x_stride=(4, 1), scale=scale))]


@pytest.mark.parametrize("name, plan, message", [
    ("huge_grid_x", _grid_plan((2**31, 1, 1)), r"huge_grid_x: the call needs a grid of \(2147483648, 1, 1\) blocks"),
    ("huge_grid_y", _grid_plan((1, 65536, 1)), r"huge_grid_y: the call needs a grid of \(1, 65536, 1\) blocks"),
    ("huge_field", _grid_plan((1, 1, 1), rows=2**63), r"huge_field: a value does not fit its kernel parameter"),
    ("huge_float", _grid_plan((1, 1, 1), scale=1e300), r"huge_float: a value does not fit its kernel parameter"),
])
def test_a_plan_past_cuda_or_its_params_is_refused(name, plan, message):
    """A safety net under the ops' own checks (which name the argument): a grid past CUDA's limits, or a value
    past its params field's C type, is a ValueError naming the op, not a driver or struct error."""
    op = _declare(f"{name}(Tensor! out, Tensor x) -> ()", [TensorArg("x", "in", ("n",)),
                                                           TensorArg("out", "out", ("n",))], plan=plan)
    call, infos = op.validate((torch.empty(4), torch.empty(4)))
    with pytest.raises(ValueError, match=message):
        op._layout(call, infos, (torch.empty(4), torch.empty(4)))


def _lazily_negated(shape):
    return torch.randn(shape, dtype=torch.complex64).conj().imag  # shows -imag, holds +imag


@pytest.mark.parametrize("case, make_args, error, message", [
    ("sparse x", lambda: (torch.empty(3, 4), torch.randn(3, 4).to_sparse(), 2.0), TypeError,
     r"x is a torch.sparse_coo tensor; cupy_ops reads strided"),
    ("negative-bit x", lambda: (torch.empty(3, 4), _lazily_negated((3, 4)), 2.0), TypeError,
     r"x is a lazily negated or conjugated view"),
    ("out requires grad", lambda: (torch.empty(3, 4, requires_grad=True), torch.randn(3, 4), 2.0), ValueError,
     r"out requires grad, but the op writes it in place"),
    ("expanded out on meta", lambda: (torch.empty(1, 4, device="meta").expand(3, 4), torch.empty(3, 4, device="meta"),
                                      2.0), ValueError, r"out must not have elements that share memory"),
    ("Parameter beside meta", lambda: (torch.nn.Parameter(torch.empty(3, 4), requires_grad=False),
                                       torch.empty(3, 4, device="meta"), 2.0), ValueError, r"out is on cpu but x is on meta"),
])
def test_tensors_the_kernels_cannot_read_as_given_are_refused(case, make_args, error, message):
    """Memory that does not hold what the tensor shows (sparse, the negative bit), an output autograd would have
    to track, an expanded output (a layout question: meta tensors too), and an nn.Parameter, which is validated
    as a plain tensor (through the dispatcher, one mixed with meta tensors reached the no-op fake kernel)."""
    args = make_args()
    with pytest.raises(error, match=rf"^scaled_copy: {message}"):
        OP.public(*args)


def test_a_parameter_is_a_plain_tensor():
    out = torch.nn.Parameter(torch.empty(3, 4), requires_grad=False)
    x = torch.randn(3, 4)
    OP.public(out, x, 3.0)
    torch.testing.assert_close(out.detach(), x * 3)


def test_a_reference_must_return_a_tuple():
    """A bare tensor would be iterated by rows ("returned 5 results"): the error says what the runtime needs."""
    op = _declare("bare_ref(Tensor! out, Tensor x) -> ()", [TensorArg("x", "in", ("n",)),
                                                           TensorArg("out", "out", ("n",))],
                  reference=lambda out, x, **kwargs: x * 2)
    with pytest.raises(TypeError, match=r"bare_ref: the reference must return a tuple .* got Tensor"):
        op.public(torch.empty(5), torch.randn(5))


@pytest.fixture(scope="module")
def int_scalar_op():
    return _declare("scalars_i(Tensor! out, int k) -> ()", [TensorArg("out", "out")])


@pytest.mark.parametrize("value, error", [(True, "must be an int, got bool"), (2.0, "must be an int, got float"),
                                          (None, "must be int, got None")])
def test_scalar_types_are_checked(int_scalar_op, value, error):
    with pytest.raises(TypeError, match=f"scalars_i: k {error}"):
        int_scalar_op.public(torch.empty(2), value)


def test_numpy_scalars_pass_as_torch_ops_takes_them():
    """np.int64 and np.float32 (numbers.Integral / numbers.Real) are accepted for int and float arguments, as
    Python's, and reach check and plan as Python int and float."""
    op = _declare("scalars_np(Tensor! out, int k, float s) -> ()", [TensorArg("out", "out")])
    call, _ = op.validate((torch.empty(2), np.int64(3), np.float32(0.5)))
    assert (call.k, call.s) == (3, 0.5) and type(call.k) is int and type(call.s) is float
    with pytest.raises(TypeError, match="scalars_np: k must be an int, got float64"):
        op.validate((torch.empty(2), np.float64(3.0), 0.5))


def test_a_schema_written_argument_the_kernel_only_reads_may_overlap_inputs():
    """vLLM's selective_scan_fwd marks inputs `Tensor!`: declared "in", they may share memory with other inputs,
    while a written one ("out") may not."""
    op = _declare("reads_marked(Tensor! a, Tensor! b, Tensor! out) -> ()",
                  [TensorArg("a", "in", ("n",)), TensorArg("b", "in", ("n",)), TensorArg("out", "out", ("n",))])
    assert op.writes == ["out"] and op.written == ["a", "b", "out"]
    x = torch.randn(4)
    op.validate((x, x, torch.empty(4)))
    with pytest.raises(ValueError, match="reads_marked: out overlaps a in memory"):
        op.validate((x, torch.randn(4), x))


def test_a_gpu_older_than_sm_80_is_refused_before_anything_compiles(int_scalar_op, monkeypatch):
    """Tensors on a GPU of compute capability below 8.0 get a ValueError naming the op and the tensor, not an NVRTC
    error at the first compile (the top-k kernels use sm_80 instructions). Faked on the CPU: the tensor reads as
    cuda:0's, and cuda:0 as a T4 (7.5)."""
    from cupy_ops._runtime import arrays, launcher

    describe = arrays.describe
    monkeypatch.setattr(arrays, "describe", lambda *a: describe(*a)._replace(device=0))
    monkeypatch.setattr(launcher, "device_arch", lambda device: 75)
    with pytest.raises(ValueError, match=r"scalars_i: out is on cuda:0, a GPU of compute capability 7\.5; "
                                         r"cupy_ops needs 8\.0 or newer"):
        int_scalar_op.validate((torch.empty(2), 1))
    monkeypatch.setattr(launcher, "device_arch", lambda device: 80)
    assert int_scalar_op.validate((torch.empty(2), 1))[0].device == 0
