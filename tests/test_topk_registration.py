"""The top-k ops as torch.library ops: opcheck (schema mutations, fake tensors, AOT dispatch) and
torch.compile(fullgraph=True) against eager, on the CPU kernel and (with a GPU) on CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, compiled_matches_eager, opcheck
from topk_utils import DECODE, PERSISTENT, PREFILL, decode_args, make_scores, persistent_args, prefill_args


def _args(op, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = make_scores("ties", 6, 700, gen, device)
    if op is PREFILL:
        return prefill_args(logits, [0, 3, 5, 0, 9, 2], [700, 600, 100, 30, 1, 0], 64)
    if op is DECODE:
        return decode_args(logits, 2, [700, 65, 10], 64)
    return persistent_args(logits, [700, 65, 64, 63, -1, 900], 64, max_seq_len=690)


OPS = [pytest.param(PREFILL, id="prefill"), pytest.param(DECODE, id="decode"),
       pytest.param(PERSISTENT, id="persistent")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, device):
    opcheck(op, _args(op, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
def test_torch_compile_fullgraph(op, device):
    compiled_matches_eager(op, lambda: _args(op, device, seed=1))


@pytest.mark.parametrize("op", OPS)
def test_registered_under_vllm_names(op):
    schema = str(op.overload._schema)
    assert schema.startswith(f"cupy_ops::{op.name}(")
    # persistent_topk's workspace is read-only (never touched), exactly as in vLLM's schema
    assert ("Tensor workspace," in schema) == (op is PERSISTENT)
    assert op.written == [{"top_k_per_row_prefill": "indices", "top_k_per_row_decode": "indices",
                           "persistent_topk": "output"}[op.name]]
