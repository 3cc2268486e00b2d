"""Every op's registered schema against the schema vLLM 0.33's compiled library registers for the same name (the
anchor library: it loads with torch's CUDA build only, so this runs on GPU machines): a drop-in has vLLM's argument
names (keyword calls), order, types, defaults and written arguments. The per-op registration tests type the
schemas out from the specs; this one reads them from vLLM's binary."""

from __future__ import annotations

import pytest
from helpers import schema_arguments

from cupy_ops.ops import ops

# (op, argument) -> why it differs from vLLM on purpose; only its name and place are compared.
DELIBERATE = {("merge_attn_states", "prefill_tokens_with_context"):
              "int? rather than int!?: an alias annotation on an int breaks functionalization (merge_attn_states.py)"}


@pytest.mark.parametrize("name", list(ops()))
def test_schema_equals_vllms(name, vllm_ops):
    ours = ops()[name].overload._schema
    theirs = getattr(vllm_ops, name).default._schema
    mine, vllm = schema_arguments(ours), schema_arguments(theirs)
    assert [a.name for a in mine] == [a.name for a in vllm], f"{name}: argument names or order differ"
    for a, b in zip(mine, vllm):
        if (name, a.name) not in DELIBERATE:
            assert a == b, f"{name}: argument {a.name} is {a}, vLLM's {b}"
    assert len(ours.returns) == len(theirs.returns) == 0
