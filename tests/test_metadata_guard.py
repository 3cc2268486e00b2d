"""`arrays.metadata_guard`, the C++ check (dynamo's TensorGuards, a private torch API) that lets an op call
reuse the previous call's layout without reading every tensor's metadata in Python, and the runtime's matcher
built on it (`op._metadata_matcher`), which also handles one tensor given for two arguments. On CPU tensors: it
must say yes only to tensors alike in every respect the launch depends on, and `absent()` must stand for a
missing optional tensor that no real tensor matches."""

from __future__ import annotations

import pytest
import torch

from cupy_ops._runtime import arrays
from cupy_ops._runtime.op import _metadata_matcher

BASE = {"output": torch.zeros(5, 3, 8, dtype=torch.bfloat16), "lse": torch.zeros(3, 5)}


def _like_base(**changes) -> tuple:
    tensors = {name: torch.zeros_like(t) for name, t in BASE.items()}
    tensors.update(changes)
    return tensors["output"], tensors["lse"]


@pytest.fixture(scope="module")
def guard():
    check = arrays.metadata_guard(*BASE.values())
    assert check is not None, "this torch has no usable TensorGuards: the merge fast path would be off"
    return check


def test_same_metadata_passes_whatever_the_data_and_pointers(guard):
    assert guard(*_like_base())
    assert guard(*_like_base(output=torch.full((5, 3, 8), 7.0, dtype=torch.bfloat16)))
    offset = torch.zeros(5 * 3 * 8 + 1, dtype=torch.bfloat16)[1:].view(5, 3, 8)  # pointers are not its business
    assert guard(*_like_base(output=offset))


@pytest.mark.parametrize("change", [
    pytest.param({"output": torch.zeros(5, 3, 8, dtype=torch.float16)}, id="dtype"),
    pytest.param({"output": torch.zeros(6, 3, 8, dtype=torch.bfloat16)}, id="shape"),
    pytest.param({"output": torch.zeros(5, 4, 8, dtype=torch.bfloat16)[:, :3]}, id="token-stride"),
    pytest.param({"lse": torch.zeros(5, 3).t()}, id="transposed-lse"),
    pytest.param({"lse": torch.zeros(3, 5, requires_grad=True)}, id="requires-grad"),
    pytest.param({"lse": torch.nn.Parameter(torch.zeros(3, 5), requires_grad=False)}, id="subclass"),
    pytest.param({"lse": arrays.absent()}, id="absent"),
])
def test_any_other_metadata_fails(guard, change):
    assert not guard(*_like_base(**change))


def test_absent_matches_only_a_stand_in():
    no_lse, no_scale = arrays.absent(), arrays.absent()
    check = arrays.metadata_guard(BASE["output"], no_lse, no_scale)
    assert check is not None
    assert check(torch.zeros_like(BASE["output"]), no_lse, no_scale)
    assert not check(torch.zeros_like(BASE["output"]), torch.zeros(0), no_scale)  # its metadata, another type
    assert not check(torch.zeros_like(BASE["output"]), torch.zeros(3, 5), no_scale)


def test_one_object_given_twice_never_passes():
    """Why each optional argument has its own stand-in, and why the runtime's matcher guards unique objects."""
    output = BASE["output"]
    assert arrays.metadata_guard(output, output) is None
    check = arrays.metadata_guard(output, torch.zeros_like(output))
    assert not check(output, output)
    assert check(output, output.view(output.shape))


def test_without_a_usable_tensorguards_there_is_no_guard(monkeypatch):
    monkeypatch.setattr(arrays, "_TensorGuards", None)
    assert arrays.metadata_guard(*BASE.values()) is None

    def refuses(*args, **kwargs):
        raise TypeError("another signature")

    monkeypatch.setattr(arrays, "_TensorGuards", refuses)
    assert arrays.metadata_guard(*BASE.values()) is None


def test_matcher_handles_one_object_given_twice():
    """A sampler caller passes one mask as prompt_mask and output_mask: the matcher passes a call that repeats one
    object in the same places, with the same metadata, and nothing else."""
    mask, logits = torch.zeros(3, 7, dtype=torch.bool), torch.zeros(3, 7)
    check = _metadata_matcher([logits, mask, mask])
    assert check is not None
    other_mask = torch.ones(3, 7, dtype=torch.bool)
    assert check(torch.zeros(3, 7), other_mask, other_mask)
    assert not check(torch.zeros(3, 7), other_mask, torch.ones(3, 7, dtype=torch.bool))  # two objects now
    strided = torch.ones(3, 8, dtype=torch.bool)[:, :7]
    assert not check(torch.zeros(3, 7), strided, strided)  # same object twice, other strides
    wide = torch.ones(3, 9, dtype=torch.bool)
    assert not check(torch.zeros(3, 7), wide, wide)  # same object twice, other shape


def test_matcher_of_distinct_objects_refuses_one_object_twice():
    masks = [torch.zeros(3, 7, dtype=torch.bool) for _ in range(2)]
    check = _metadata_matcher([torch.zeros(3, 7), *masks])
    mask = torch.ones(3, 7, dtype=torch.bool)
    assert not check(torch.zeros(3, 7), mask, mask)
