"""Benchmark suite of merge_attn_states: cases, inputs, providers (ours, vLLM's, the torch baseline), gold."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import torch

import cupy_ops
from cupy_ops.ops.merge_attn_states import OP

from .harness import OpSuite, first_call_probe, poison

# ---- merge_attn_states -----------------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_FP8_SCALE = 0.02  # merged values are ~N(0, 1), so value / scale stays well inside e4m3's +-448


@dataclasses.dataclass(frozen=True)
class MergeCase:
    """n tokens x h heads x d head size; inputs `dtype`, output fp8 e4m3 (with a scale) when `fp8_output`."""

    n: int
    h: int
    d: int
    dtype: torch.dtype = torch.bfloat16
    fp8_output: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.n, self.h, self.d)

    @property
    def name(self) -> str:
        return f"{self.n}x{self.h}x{self.d}"

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.dtype] + ("->fp8" if self.fp8_output else "")

    @property
    def output_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.fp8_output else self.dtype

    @property
    def input_bytes(self) -> int:
        """prefix_output + suffix_output [n, h, d] and the two lse [h, n] float32, read once."""
        return 2 * self.n * self.h * self.d * self.dtype.itemsize + 2 * 4 * self.h * self.n

    @property
    def bytes_moved(self) -> int:
        """Inputs read once + output [n, h, d] and output_lse [h, n] written once (+ the 4-byte fp8 scale)."""
        out = self.n * self.h * self.d * self.output_dtype.itemsize + 4 * self.h * self.n
        return self.input_bytes + out + (4 if self.fp8_output else 0)

    def __str__(self) -> str:
        return f"{self.name}-{self.dtype_name}"


def merge_cases(quick: bool = False) -> list[MergeCase]:
    """The anchor's shapes (4096/16384/1 x 32 x 128, 4096 x 128 x 64 bf16), a small batch, each input dtype,
    bf16 in -> fp8 out as in vLLM's MLA benchmark, and d = 80 (not a power of two)."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    if quick:
        return [MergeCase(4096, 32, 128, bf16), MergeCase(1, 32, 128, bf16),
                MergeCase(1024, 128, 128, bf16, fp8_output=True)]
    return [MergeCase(4096, 32, 128, bf16), MergeCase(16384, 32, 128, bf16), MergeCase(4096, 128, 64, bf16),
            MergeCase(1, 32, 128, bf16), MergeCase(256, 32, 128, bf16), MergeCase(4096, 32, 128, fp32),
            MergeCase(4096, 32, 128, fp16), MergeCase(1024, 128, 128, bf16, fp8_output=True),
            MergeCase(1, 128, 128, bf16, fp8_output=True), MergeCase(4096, 32, 80, bf16)]


def make_merge_inputs(case: MergeCase, seed: int = 0, device: str = "cuda") -> tuple:
    """Positional op args (output [n,h,d], output_lse [h,n], prefix_output, prefix_lse, suffix_output,
    suffix_lse, None, output_scale): random values (never zeros), ~2% -inf per lse, poisoned outputs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, h, d = case.shape

    def values():
        return torch.randn(n, h, d, generator=gen, device=device).to(case.dtype)

    def lse():
        raw = torch.randn(h, n, generator=gen, device=device) * 3.0
        empty = torch.rand(h, n, generator=gen, device=device) < 0.02
        return raw.masked_fill(empty, -math.inf)

    prefix_output, prefix_lse, suffix_output, suffix_lse = values(), lse(), values(), lse()
    output = torch.empty(n, h, d, dtype=case.output_dtype, device=device)
    output_lse = torch.empty(h, n, dtype=torch.float32, device=device)
    poison(output, output_lse)
    scale = torch.tensor([_FP8_SCALE], dtype=torch.float32, device=device) if case.fp8_output else None
    return (output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse, None, scale)


def merge_reference_into(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                         prefill_tokens_with_context=None, output_scale=None) -> None:
    """The reference (float32 math) written into the outputs: what the torch baseline compiles."""
    out, lse = OP.reference(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                            prefill_tokens_with_context, output_scale)
    output.copy_(out)
    if output_lse is not None:
        output_lse.copy_(lse)


def vllm_supports_merge(case: MergeCase) -> bool:
    """vLLM needs d to be a whole number of 16-byte packs (8 elements for 16-bit types, 4 for fp32)."""
    return case.d % (16 // case.dtype.itemsize) == 0


def merge_providers(case: MergeCase, vllm_ops=None) -> dict[str, Callable]:
    """{name: fn(*args)} besides the torch baseline: our eager public function and vLLM's op if it applies."""
    providers: dict[str, Callable] = {"cupy_ops": cupy_ops.merge_attn_states}
    if vllm_ops is not None and vllm_supports_merge(case):
        providers["vllm"] = vllm_ops.merge_attn_states
    return providers


def merge_gold(args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """float64-math reference of (output, output_lse), rounded like the op rounds."""
    return OP.reference(*args, compute_dtype=torch.float64)


def merge_eager_calls(vllm_ops=None) -> dict[str, tuple[Callable, tuple]]:
    """{name: (fn, args)} on 1 x 32 x 128 bf16: eager public call, the same when every call has another layout
    than the last (1 and 2 tokens in turn), dispatcher call, vLLM's op call, and our launch without validation
    (the per-call floor of this VM's driver and binding)."""
    args = make_merge_inputs(MergeCase(1, 32, 128, torch.bfloat16))
    # A repeated layout passes the last layout's C++ metadata guard; a changed one builds the dict key. The
    # alternation itself (a cycle and an unpacking) adds ~0.1 us.
    next_args = itertools.cycle((args, make_merge_inputs(MergeCase(2, 32, 128, torch.bfloat16)))).__next__

    def merge_alternating_layouts() -> None:
        cupy_ops.merge_attn_states(*next_args())

    calls = {"cupy_ops": (cupy_ops.merge_attn_states, args),
             "cupy_ops_layout_changing": (merge_alternating_layouts, ()),
             "cupy_ops_dispatcher": (torch.ops.cupy_ops.merge_attn_states, args)}
    if vllm_ops is not None:
        calls["vllm"] = (vllm_ops.merge_attn_states, args)
    # The floor under both: our launch alone (params packed, one cuLaunchKernelEx), the layout found beforehand.
    cupy_ops.merge_attn_states(*args)
    tensors = [standin if (t := args[i]) is None else t for i, standin in OP._tensor_slots]
    calls["launch_only"] = (OP._launch, (OP._recent, [t.data_ptr() for t in tensors]))
    return calls


# Child process: first call (compile or disk-cache load, module load, first launch) of one instantiation.
_MERGE_COMPILE_PROBE = first_call_probe(
    "merge_attn_states", "from cupy_ops._bench.merge_attn_states import MergeCase, make_merge_inputs\n"
                         "args = make_merge_inputs(MergeCase(1, 32, 128, torch.bfloat16))")


SUITE = OpSuite(
    op="merge_attn_states", cases=merge_cases, make_inputs=make_merge_inputs, providers=merge_providers,
    reference_into=merge_reference_into, outputs=lambda args: (args[0], args[1]), gold=merge_gold,
    output_dtypes=lambda case: (case.output_dtype, torch.float32),
    eager_calls=merge_eager_calls,
    eager_providers=("cupy_ops", "cupy_ops_layout_changing", "cupy_ops_dispatcher", "vllm", "launch_only"),
    compile_probe=_MERGE_COMPILE_PROBE, small_case="1x32x128 bf16",
)
