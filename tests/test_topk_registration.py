"""The top-k ops as torch.library ops: opcheck (schema mutations, fake tensors, AOT dispatch) and
torch.compile(fullgraph=True) against eager, on the CPU kernel and (with a GPU) on CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, compiled_matches_eager, opcheck, schema_arguments
from topk_utils import DECODE, PREFILL, decode_args, make_scores, persistent_args, prefill_args

from cupy_ops.ops import ops

# vLLM's schemas as in the specs (sampler_ops.md 2.1, persistent_topk.md 2.1 / its Schema row; decode's third argument
# is seq_lens, as vLLM 0.33's binary registers it: test_vllm_schemas.py reads them from there on a GPU machine), typed
# out here rather than read from the ops: the registered ops must match them argument for argument.
VLLM_SCHEMAS = {
    "top_k_per_row_prefill": "top_k_per_row_prefill(Tensor logits, Tensor rowStarts, Tensor rowEnds, Tensor! indices, "
                             "int numRows, int stride0, int stride1, int topK) -> ()",
    "top_k_per_row_decode": "top_k_per_row_decode(Tensor logits, int next_n, Tensor seq_lens, Tensor! indices, "
                            "int numRows, int stride0, int stride1, int topK) -> ()",
    "persistent_topk": "persistent_topk(Tensor logits, Tensor lengths, Tensor! output, Tensor workspace, int k, "
                       "int max_seq_len) -> ()",
}


def _args(op, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = make_scores("ties", 6, 700, gen, device)
    if op is PREFILL:
        return prefill_args(logits, [0, 3, 5, 0, 9, 2], [700, 600, 100, 30, 1, 0], 64)
    if op is DECODE:
        return decode_args(logits, 2, [700, 65, 10], 64)
    return persistent_args(logits, [700, 65, 64, 63, -1, 900], 64, max_seq_len=690)


OPS = [pytest.param(ops()[name], id=name) for name in VLLM_SCHEMAS]  # the registry's ops of vLLM's names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, device):
    opcheck(op, _args(op, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op, device):
    compiled_matches_eager(op, lambda: _args(op, device, seed=1))


@pytest.mark.parametrize("name", VLLM_SCHEMAS)
def test_registered_with_vllm_schema(name):
    """torch.ops.cupy_ops.<name> exists and has vLLM's argument names, order, types and written arguments (the
    output only: persistent_topk's workspace is read-only, as in vLLM's schema), and returns nothing."""
    registered = getattr(torch.ops.cupy_ops, name).default._schema
    vllm = torch._C.parse_schema(VLLM_SCHEMAS[name])
    assert schema_arguments(registered) == schema_arguments(vllm)
    assert len(registered.returns) == 0
