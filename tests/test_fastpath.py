"""`fastpath.recent_call`, the straight-line call the runtime writes for the recent layout, on CPU tensors with a
recording launcher (no GPU): it launches exactly the calls like its layout, with their own pointers, and returns
False, launching nothing, for anything else (another shape, optional tensor, scalar, alignment, an overlap,
another device, not a tensor)."""

from __future__ import annotations

import enum

import pytest
import torch

from cupy_ops._runtime import fastpath, launcher
from cupy_ops._runtime.op import _metadata_matcher
from cupy_ops.ops.merge_attn_states import OP

N, H, D = 5, 3, 16


def _args(p=2, with_lse=True, offset=0, dtype=torch.float16):
    def values(*shape):
        return torch.randn(shape[0] * shape[1] * shape[2] + offset)[offset:].view(shape).to(dtype)

    output = torch.empty(N * H * D + offset, dtype=dtype)[offset:].view(N, H, D)
    return (output, torch.empty(H, N) if with_lse else None, values(N, H, D), torch.randn(H, N), values(N, H, D),
            torch.randn(H, N), p, None)


def _recent_call(monkeypatch, args):
    """(recent_call for the layout of `args`, the launches it made, the current device) with launches recorded."""
    launches = []

    class RecordingLauncher:
        def __init__(self, kernel, device, config):
            self.kernel = kernel

        def launch(self, stream, pack_into, values):
            launches.append((stream, values[:-1]))

    monkeypatch.setattr(launcher, "Launcher", RecordingLauncher)
    call, infos = OP.validate(args)
    layout = OP._layout(call, infos, args)
    match = _metadata_matcher([args[i] for i, _ in OP._tensor_slots if args[i] is not None])
    current = {"device": call.device}
    return fastpath.recent_call(OP, layout, match, lambda: current["device"], lambda device: 0x5EA), launches, current


@pytest.fixture
def recent(monkeypatch):
    """(recent_call for the layout of `_args()`, the launches it made, the current device)."""
    return _recent_call(monkeypatch, _args())


def test_launches_calls_like_its_layout_with_their_own_pointers(recent):
    call, launches, _ = recent
    for _ in range(2):
        args = _args()
        assert call(*args)
        pointers = [0 if a is None else a.data_ptr() for a in args[:6]] + [0]  # output_scale absent
        assert launches[-1] == (0x5EA, tuple(pointers))
    assert len(launches) == 2


@pytest.mark.parametrize("change", [
    pytest.param(lambda: _args(with_lse=False), id="no-output-lse"),
    pytest.param(lambda: _args(p=3), id="another-prefill-count"),
    pytest.param(lambda: _args(p=None), id="no-prefill-count"),
    pytest.param(lambda: _args(p=True), id="bool-count"),
    pytest.param(lambda: _args(p=2.0), id="float-count"),
    pytest.param(lambda: _args(offset=1), id="misaligned"),
    pytest.param(lambda: _args(dtype=torch.bfloat16), id="dtype"),
    pytest.param(lambda: (lambda a: (a[2], *a[1:]))(_args()), id="output-is-prefix"),
    pytest.param(lambda: (lambda a: (*a[:7], torch.ones(1)))(_args()), id="with-scale"),
    pytest.param(lambda: (lambda a: (a[0].tolist(), *a[1:]))(_args()), id="not-a-tensor"),
])
def test_anything_else_is_left_to_the_general_path(recent, change):
    call, launches, _ = recent
    assert not call(*change())
    assert launches == []


def test_another_current_device_is_left_to_the_general_path(recent):
    call, launches, current = recent
    current["device"] = 7
    assert not call(*_args()) and launches == []


def test_the_source_reads_as_documented(recent, monkeypatch):
    args = _args()
    call, infos = OP.validate(args)
    layout = OP._layout(call, infos, args)
    source, _ = fastpath.recent_call_source(OP, layout, None, lambda: 0, lambda d: 0)
    assert source.startswith("def recent_call(output, output_lse, prefix_output, prefix_lse, suffix_output, "
                             "suffix_lse, prefill_tokens_with_context, output_scale):")
    assert "if output_lse is None or output_scale is not None:" in source
    assert ("prefill_tokens_with_context.__class__ is not type_prefill_tokens_with_context or "
            "prefill_tokens_with_context != value_prefill_tokens_with_context") in source
    assert "launch_0(stream, pack_0, (p0, p1, p2, p3, p4, p5, 0, tail_0))" in source


class Count(enum.IntEnum):
    TWO = 2


def test_an_int_subclass_scalar_is_its_own_layout(monkeypatch):
    """A layout made with an IntEnum count takes calls with that member, leaves a plain 2 to the general path (its
    class differs) and raises nothing (the written test names the class by object, not by name)."""
    call, launches, _ = _recent_call(monkeypatch, _args(p=Count.TWO))
    assert call(*_args(p=Count.TWO)) and len(launches) == 1
    assert not call(*_args(p=2)) and len(launches) == 1


def _interleaved_args(first_half_out=True):
    """output and prefix_output as the two halves of one [N, 2H, D] buffer (disjoint, interleaved spans)."""
    buffer = torch.randn(N, 2 * H, D, dtype=torch.float16)
    low, high = buffer[:, :H], buffer[:, H:]
    output, prefix = (low, high) if first_half_out else (high, low)
    args = list(_args())
    args[0], args[2] = output, prefix
    return tuple(args)


def test_disjoint_interleaved_views_stay_on_the_recent_call(monkeypatch):
    """Views of one buffer whose spans overlap but share no element pass validation once; calls in the same
    arrangement then launch from the recent call (no validation each time), another arrangement is left to the
    general path."""
    call, launches, _ = _recent_call(monkeypatch, _interleaved_args())
    args = _interleaved_args()
    assert call(*args) and launches[-1][1][0] == args[0].data_ptr()
    assert not call(*_interleaved_args(first_half_out=False)) and len(launches) == 1
    OP.validate(_interleaved_args(first_half_out=False))  # but it is valid too: the general path takes it


def test_a_freed_storage_is_left_to_the_full_check_which_refuses_it(recent):
    call, launches, _ = recent
    args = _args()
    args[2].untyped_storage().resize_(0)  # as FSDP frees a parameter: same metadata, no memory
    assert not call(*args) and launches == []
    with pytest.raises(ValueError, match=r"^merge_attn_states: prefix_output reaches past its storage \(0 bytes\)"):
        OP.validate(args)

