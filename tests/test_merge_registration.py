"""torch.library registration of merge_attn_states: schema, opcheck, torch.compile(fullgraph=True), keywords."""

from __future__ import annotations

import pytest
import torch
from merge_utils import DEVICES, FP8, assert_bitwise_equal, make_case, synchronize

import cupy_ops

OP = torch.ops.cupy_ops.merge_attn_states.default

# vLLM's argument names and order (the op schema's; vLLM's Python wrapper orders them differently).
VLLM_ARGUMENTS = ["output", "output_lse", "prefix_output", "prefix_lse", "suffix_output", "suffix_lse",
                  "prefill_tokens_with_context", "output_scale"]


def test_schema_matches_vllm_except_the_int_annotation():
    """Same names and order as vLLM; output and output_lse written (Tensor(a!)), inputs only read; the prefill
    count is a plain optional int (`int?`: an alias annotation on an int breaks functionalization)."""
    schema = OP._schema
    assert [a.name for a in schema.arguments] == VLLM_ARGUMENTS
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["output", "output_lse"]
    p = schema.arguments[6]
    assert str(p.type) == "Optional[int]" and p.alias_info is None
    assert schema.arguments[7].has_default_value() and schema.returns == []


# opcheck argument sets: (id, make_case keyword arguments). Why each: the plain call; no output_lse with an int
# p; non-contiguous inputs (head-major, transposed lse) with p = 0; fp8 output with a scale; no tokens at all.
OPCHECK_CASES = {
    "float32": {"n": 9, "h": 3, "d": 16, "dtype": torch.float32},
    "bfloat16-no-lse-p": {"n": 9, "h": 3, "d": 16, "dtype": torch.bfloat16, "with_output_lse": False, "p": 4},
    "float16-head-major-p0": {"n": 9, "h": 3, "d": 16, "dtype": torch.float16, "layout": "head_major", "p": 0},
    "fp8": {"n": 9, "h": 3, "d": 16, "dtype": torch.bfloat16, "fp8": True, "p": 5},
    "empty": {"n": 0, "h": 3, "d": 16, "dtype": torch.float16},
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_id", OPCHECK_CASES)
def test_opcheck(device, case_id):
    """Schema (mutations declared), autograd registration, fake tensor and AOT dispatch checks."""
    kwargs = dict(OPCHECK_CASES[case_id])
    n, h, d, dtype = kwargs.pop("n"), kwargs.pop("h"), kwargs.pop("d"), kwargs.pop("dtype")
    case = make_case(n, h, d, dtype, device, seed=1, **kwargs)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if case.output.dtype == FP8:
        # test_schema compares the outputs before and after with torch.allclose, which torch does not implement
        # for float8 ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'): a torch limit, not ours.
        utils = utils[1:]
    torch.library.opcheck(OP, case.args(), test_utils=utils)


def _merged(po, pl, so, sl, p, scale):
    """Allocates the outputs (fp8 when a scale is given) and merges into them: the shape of a real caller."""
    out = torch.empty(po.shape, dtype=po.dtype if scale is None else FP8, device=po.device)
    out_lse = torch.empty(pl.shape, dtype=torch.float32, device=po.device)
    cupy_ops.merge_attn_states(out, out_lse, po, pl, so, sl, p, scale)
    return out, out_lse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [False, True], ids=["float16", "fp8"])
def test_torch_compile_fullgraph_matches_eager(device, fp8):
    """The public function traces into one graph (fullgraph=True: no graph break) and gives eager's bits, for
    two p values through one compiled function."""
    torch._dynamo.reset()
    compiled = torch.compile(_merged, fullgraph=True)
    for p in (None, 5):
        case = make_case(11, 3, 32, torch.float16, device, fp8=fp8, p=p, seed=7)
        args = (case.prefix_output, case.prefix_lse, case.suffix_output, case.suffix_lse, p, case.output_scale)
        got = compiled(*args)
        want = _merged(*args)
        synchronize(device)
        assert_bitwise_equal(got[0], want[0], f"compiled output, p={p}")
        assert_bitwise_equal(got[1], want[1], f"compiled output_lse, p={p}")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_with_the_optional_arguments_left_out(device):
    """The README's compiled call: six arguments, the optional ones left out (the schema gives the prefill count
    no default, so the public function fills it in, also while compiling), positionally and by keyword."""
    torch._dynamo.reset()

    def six(out, out_lse, p, pl, s, sl):
        cupy_ops.merge_attn_states(out, out_lse, p, pl, s, sl)

    def keywords(out, out_lse, p, pl, s, sl):
        cupy_ops.merge_attn_states(output=out, output_lse=out_lse, prefix_output=p, prefix_lse=pl, suffix_output=s,
                                   suffix_lse=sl)

    case = make_case(10, 2, 16, torch.bfloat16, device, seed=3)
    inputs = (case.prefix_output, case.prefix_lse, case.suffix_output, case.suffix_lse)
    want = _merged(*inputs, None, None)
    for call in (six, keywords):
        out, out_lse = torch.full_like(want[0], float("nan")), torch.full_like(want[1], float("nan"))
        torch.compile(call, fullgraph=True)(out, out_lse, *inputs)
        synchronize(device)
        assert_bitwise_equal(out, want[0], f"output of {call.__name__}")
        assert_bitwise_equal(out_lse, want[1], f"output_lse of {call.__name__}")


@pytest.mark.parametrize("device", DEVICES)
def test_keyword_call_in_vllm_wrapper_order(device):
    """vLLM's Python wrapper passes (output, prefix_output, prefix_lse, suffix_output, suffix_lse, output_lse, ...):
    with keywords, that order works here too, through the public function and the registered op."""
    case = make_case(8, 2, 24, torch.bfloat16, device, p=6, seed=9)
    results = []
    for entry in (cupy_ops.merge_attn_states, torch.ops.cupy_ops.merge_attn_states):
        case.output.zero_()
        case.output_lse.zero_()
        entry(output=case.output, prefix_output=case.prefix_output, prefix_lse=case.prefix_lse,
              suffix_output=case.suffix_output, suffix_lse=case.suffix_lse, output_lse=case.output_lse,
              prefill_tokens_with_context=case.p, output_scale=None)
        results.append((case.output.clone(), case.output_lse.clone()))
    want_out, want_lse = _merged(case.prefix_output, case.prefix_lse, case.suffix_output, case.suffix_lse, case.p,
                                 None)
    synchronize(device)
    for got_out, got_lse in results:
        assert_bitwise_equal(got_out, want_out, "output of a keyword call")
        assert_bitwise_equal(got_lse, want_lse, "output_lse of a keyword call")


class _MergeModule(torch.nn.Module):
    def forward(self, prefix_output, prefix_lse, suffix_output, suffix_lse):
        return _merged(prefix_output, prefix_lse, suffix_output, suffix_lse, None, None)


def _traced_ops(graph: torch.fx.Graph) -> list:
    return [node.target for node in graph.nodes if node.op == "call_function" and "cupy_ops" in str(node.target)]


@pytest.mark.parametrize("tracer", ["export", "export-non-strict", "make_fx"])
def test_tracers_record_the_registered_op(tracer):
    """torch.export (dynamo or not) and make_fx trace the public function with fake tensors, whose data pointer
    cannot be read: each graph holds the registered op once, and the exported program runs like eager."""
    case = make_case(6, 2, 16, torch.float32, "cpu", seed=4)
    args = (case.prefix_output, case.prefix_lse, case.suffix_output, case.suffix_lse)
    if tracer == "make_fx":
        from torch.fx.experimental.proxy_tensor import make_fx

        graph = make_fx(_MergeModule(), tracing_mode="fake")(*args).graph
        assert _traced_ops(graph) == [OP]
        return
    program = torch.export.export(_MergeModule(), args, strict=tracer == "export")
    assert _traced_ops(program.graph) == [OP]
    got, want = program.module()(*args), _MergeModule()(*args)
    assert_bitwise_equal(got[0], want[0], "exported output")
    assert_bitwise_equal(got[1], want[1], "exported output_lse")
