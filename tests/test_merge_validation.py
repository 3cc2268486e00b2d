"""Every rejected call raises ValueError or TypeError naming the op and the argument, before anything is written.

Each case runs on the CPU (the reference kernel's path) and on CUDA tensors, where a fast acceptance check runs
first: both must reject the same calls."""

from __future__ import annotations

import re

import pytest
import torch
from merge_utils import DEVICES, FP8, assert_bitwise_equal, gpu, poison_, requires_cuda

import cupy_ops

N, H, D = 6, 3, 8  # N != H, so a [n, h] lse is the wrong shape rather than a transposed right one


def _valid_args(device, dtype=torch.float16) -> dict:
    """A valid call (output and output_lse poisoned), as keyword arguments."""
    g = torch.Generator(device=device).manual_seed(0)
    return {
        "output": poison_(torch.empty(N, H, D, dtype=dtype, device=device)),
        "output_lse": poison_(torch.empty(H, N, device=device)),
        "prefix_output": torch.randn(N, H, D, generator=g, device=device).to(dtype),
        "prefix_lse": torch.randn(H, N, generator=g, device=device),
        "suffix_output": torch.randn(N, H, D, generator=g, device=device).to(dtype),
        "suffix_lse": torch.randn(H, N, generator=g, device=device),
        "prefill_tokens_with_context": None,
        "output_scale": None,
    }


def _float32(a: dict) -> None:
    """Switch the call to float32 tensors, so that lse-sized views of output memory are possible."""
    for name in ("output", "prefix_output", "suffix_output"):
        a[name] = a[name].float()


def _fp8_output(a: dict) -> None:
    a["output"] = torch.empty(N, H, D, dtype=FP8, device=a["output"].device)


def _shifted_by_one_token(a: dict, name: str) -> None:
    """`name` and output become windows of one buffer that start one token apart."""
    buffer = torch.zeros(N + 1, H, D, dtype=a[name].dtype, device=a[name].device)
    a[name], a["output"] = buffer[:N], buffer[1:]


def _lse_inside_output(a: dict, name: str) -> None:
    _float32(a)
    a[name] = a["output"].view(-1)[5:5 + H * N].view(H, N)


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, last-dim stride 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


# (id, exception, argument the message must name, change to the valid call)
CASES = [
    ("prefix-2d", ValueError, "prefix_output", lambda a: a.update(prefix_output=a["prefix_output"][:, 0])),
    ("prefix-4d", ValueError, "prefix_output", lambda a: a.update(prefix_output=a["prefix_output"][None])),
    ("suffix-fewer-tokens", ValueError, "suffix_output", lambda a: a.update(suffix_output=a["suffix_output"][:-1])),
    ("output-wider-heads", ValueError, "output",
     lambda a: a.update(output=torch.empty(N, H, D + 1, dtype=a["output"].dtype, device=a["output"].device))),
    ("output-2d", ValueError, "output", lambda a: a.update(output=a["output"][:, 0])),
    ("prefix_lse-n-by-h", ValueError, "prefix_lse", lambda a: a.update(prefix_lse=a["prefix_lse"].t().contiguous())),
    ("suffix_lse-extra-token", ValueError, "suffix_lse",
     lambda a: a.update(suffix_lse=torch.zeros(H, N + 1, device=a["suffix_lse"].device))),
    ("output_lse-extra-head", ValueError, "output_lse",
     lambda a: a.update(output_lse=torch.zeros(H + 1, N, device=a["output_lse"].device))),
    ("prefix_lse-float16", TypeError, "prefix_lse", lambda a: a.update(prefix_lse=a["prefix_lse"].half())),
    ("suffix_lse-float64", TypeError, "suffix_lse", lambda a: a.update(suffix_lse=a["suffix_lse"].double())),
    ("output_lse-bfloat16", TypeError, "output_lse", lambda a: a.update(output_lse=a["output_lse"].bfloat16())),
    ("inputs-float64", TypeError, "prefix_output",
     lambda a: a.update({k: a[k].double() for k in ("output", "prefix_output", "suffix_output")})),
    ("inputs-int32", TypeError, "prefix_output",
     lambda a: a.update({k: a[k].int() for k in ("output", "prefix_output", "suffix_output")})),
    ("suffix-bfloat16", TypeError, "suffix_output", lambda a: a.update(suffix_output=a["suffix_output"].bfloat16())),
    ("output-float32", TypeError, "output", lambda a: a.update(output=a["output"].float())),
    ("scale-without-fp8-output", TypeError, "output_scale",
     lambda a: a.update(output_scale=torch.ones(1, device=a["output"].device))),
    ("fp8-output-without-scale", TypeError, "output", _fp8_output),
    ("scale-float16", TypeError, "output_scale",
     lambda a: (_fp8_output(a), a.update(output_scale=torch.ones(1, dtype=torch.half, device=a["output"].device)))),
    ("scale-two-elements", ValueError, "output_scale",
     lambda a: (_fp8_output(a), a.update(output_scale=torch.ones(2, device=a["output"].device)))),
    ("scale-2d", ValueError, "output_scale",
     lambda a: (_fp8_output(a), a.update(output_scale=torch.ones(1, 1, device=a["output"].device)))),
    ("scale-empty", ValueError, "output_scale",
     lambda a: (_fp8_output(a), a.update(output_scale=torch.ones(0, device=a["output"].device)))),
    ("scale-python-float", TypeError, "output_scale", lambda a: (_fp8_output(a), a.update(output_scale=0.5))),
    ("p-negative", ValueError, "prefill_tokens_with_context", lambda a: a.update(prefill_tokens_with_context=-1)),
    ("p-past-n", ValueError, "prefill_tokens_with_context", lambda a: a.update(prefill_tokens_with_context=N + 1)),
    ("p-float", TypeError, "prefill_tokens_with_context", lambda a: a.update(prefill_tokens_with_context=2.0)),
    ("p-bool", TypeError, "prefill_tokens_with_context", lambda a: a.update(prefill_tokens_with_context=True)),
    ("p-tensor", TypeError, "prefill_tokens_with_context",
     lambda a: a.update(prefill_tokens_with_context=torch.tensor(2))),
    ("output-last-stride-2", ValueError, "output", lambda a: a.update(output=_every_other(a["output"]))),
    ("prefix-last-stride-2", ValueError, "prefix_output",
     lambda a: a.update(prefix_output=_every_other(a["prefix_output"]))),
    ("suffix-last-stride-2", ValueError, "suffix_output",
     lambda a: a.update(suffix_output=_every_other(a["suffix_output"]))),
    ("output_lse-is-prefix_lse", ValueError, "output_lse", lambda a: a.update(output_lse=a["prefix_lse"])),
    ("output_lse-is-suffix_lse", ValueError, "output_lse", lambda a: a.update(output_lse=a["suffix_lse"])),
    ("output_lse-inside-output", ValueError, "output_lse", lambda a: _lse_inside_output(a, "output_lse")),
    ("prefix_lse-inside-output", ValueError, "prefix_lse", lambda a: _lse_inside_output(a, "prefix_lse")),
    ("output-overlaps-prefix", ValueError, "prefix_output", lambda a: _shifted_by_one_token(a, "prefix_output")),
    ("output-overlaps-suffix", ValueError, "suffix_output", lambda a: _shifted_by_one_token(a, "suffix_output")),
    # Same memory as prefix_output but another layout: each element would be read from another row than written.
    ("output-is-prefix-head-major", ValueError, "prefix_output",
     lambda a: a.update(output=a["prefix_output"].as_strided((N, H, D), (D, N * D, 1)))),
    ("output-expanded", ValueError, "output",
     lambda a: a.update(output=a["output"][:1].expand(N, H, D))),
    ("output_lse-expanded", ValueError, "output_lse",
     lambda a: a.update(output_lse=a["output_lse"][:, :1].expand(H, N))),
    ("prefix-numpy", TypeError, "prefix_output", lambda a: a.update(prefix_output=a["prefix_output"].cpu().numpy())),
    ("prefix_lse-list", TypeError, "prefix_lse", lambda a: a.update(prefix_lse=a["prefix_lse"].tolist())),
    ("suffix-none", TypeError, "suffix_output", lambda a: a.update(suffix_output=None)),
    ("output-none", TypeError, "output", lambda a: a.update(output=None)),
    ("output_lse-list", TypeError, "output_lse", lambda a: a.update(output_lse=a["output_lse"].tolist())),
]


def _expect_rejection(a: dict, exception: type, argument: str) -> None:
    written = {k: a[k] for k in ("output", "output_lse") if isinstance(a[k], torch.Tensor)}
    snapshots = {k: t.clone() for k, t in written.items()}
    with pytest.raises(exception, match=rf"merge_attn_states\b.*\b{argument}\b") as raised:
        cupy_ops.merge_attn_states(**a)
    assert not re.search(r"torch\.[a-z]", str(raised.value)), "dtypes are named as in the schema (float16)"
    if any(t.is_cuda for t in written.values()):
        torch.cuda.synchronize()
    for name, t in written.items():
        assert_bitwise_equal(t, snapshots[name], f"{name} after a rejected call")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_id, exception, argument, change", CASES, ids=[c[0] for c in CASES])
def test_rejected(device, case_id, exception, argument, change):
    a = _valid_args(device)
    change(a)
    _expect_rejection(a, exception, argument)


@pytest.mark.parametrize("device", DEVICES)
def test_valid_call_is_accepted(device):
    """The base call of the rejection cases is valid (so each case fails for its own change only)."""
    a = _valid_args(device)
    cupy_ops.merge_attn_states(**a)
    assert not a["output"].isnan().any() and not a["output_lse"].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_dim_scale_is_accepted(device):
    """A 0-d output_scale has one element, as the docstring asks."""
    a = _valid_args(device)
    _fp8_output(a)
    a["output_scale"] = torch.tensor(0.5, device=device)
    cupy_ops.merge_attn_states(**a)
    assert not a["output"].float().isnan().any()


def _cuda_args_with(name: str, where: str) -> dict:
    a = _valid_args("cuda")
    if name == "output_scale":
        _fp8_output(a)
        a["output_scale"] = torch.ones(1)
    if where == "cpu":
        a[name] = a[name].cpu()
    else:
        import cupy

        a[name] = cupy.from_dlpack(a[name])
    return a


@gpu
@requires_cuda
@pytest.mark.parametrize("name", ["output", "output_lse", "prefix_lse", "suffix_output", "suffix_lse",
                                  "output_scale"])
def test_rejected_cpu_tensor_among_cuda_tensors(name):
    """All tensors must be on one device; the message names the one that is not on prefix_output's."""
    a = _cuda_args_with(name, "cpu")
    with pytest.raises(ValueError, match=rf"merge_attn_states\b.*\b{name}\b.*cpu"):
        cupy_ops.merge_attn_states(**a)


@gpu
@requires_cuda
@pytest.mark.parametrize("name", ["output", "output_lse", "prefix_lse", "suffix_output", "suffix_lse"])
def test_rejected_cupy_array_among_torch_tensors(name):
    """One kind of array per call: a CuPy array among torch tensors is named."""
    a = _cuda_args_with(name, "cupy")
    with pytest.raises(TypeError, match=rf"merge_attn_states\b.*\b{name}\b.*CuPy"):
        cupy_ops.merge_attn_states(**a)
