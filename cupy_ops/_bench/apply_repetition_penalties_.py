"""Benchmark suite of apply_repetition_penalties_: cases, inputs, providers (ours, vLLM's, the torch baseline), gold.

Targets (issue 9, H200, copy 4250 GB/s): >= 3x vLLM at 256 x 151936 with 1%-dense masks in fp32 and bf16 (vLLM
170 and 179 us); no slower than vLLM with dense masks at 1 x 151936 (2.9 us) and 1024 x 32000 (148 us).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

import cupy_ops
from cupy_ops.ops.apply_repetition_penalties_ import OP

from .harness import OpSuite, first_call_probe

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SECTOR = 32  # bytes: the unit DRAM and L2 move, so a logit sector with one penalised token moves whole


@dataclasses.dataclass(frozen=True)
class PenaltyCase:
    """rows x vocab logits of `dtype`; each mask sets each token with probability `density` (independently);
    `one_mask`: the same tensor is passed as both masks (callers do)."""

    rows: int
    vocab: int
    dtype: torch.dtype = torch.float32
    density: float = 0.01
    one_mask: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.vocab)

    @property
    def name(self) -> str:
        kind = "dense" if self.density >= 1 else f"{self.density:.0%}"
        return f"{self.rows}x{self.vocab}-{kind}{'-one-mask' if self.one_mask else ''}"

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.dtype]

    @property
    def input_bytes(self) -> int:
        """logits, the mask(s) and the penalties, each read once in full (the device memory of one set)."""
        masks = (1 if self.one_mask else 2) * self.rows * self.vocab
        return self.rows * self.vocab * self.dtype.itemsize + masks + self.rows * self.dtype.itemsize

    @property
    def bytes_moved(self) -> int:
        """The floor: every mask byte read, and each 32-byte logit sector that holds a penalised token read and
        written (expected count; a token is penalised with probability 1 - (1 - density)^masks)."""
        masks = 1 if self.one_mask else 2
        penalised = 1.0 - (1.0 - self.density) ** masks
        per_sector = _SECTOR // self.dtype.itemsize
        sectors = self.rows * -(-self.vocab // per_sector) * (1.0 - (1.0 - penalised) ** per_sector)
        return int(masks * self.rows * self.vocab + 2 * _SECTOR * sectors + self.rows * self.dtype.itemsize)

    def __str__(self) -> str:
        return f"{self.name}-{self.dtype_name}"


def penalty_cases(quick: bool = False) -> list[PenaltyCase]:
    """The issue's targets (1% masks at 256 x 151936, fp32 and bf16; dense masks at 1 x 151936 and
    1024 x 32000), one tensor as both masks, and a half-dense case."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if quick:
        return [PenaltyCase(256, 151936, fp32), PenaltyCase(1, 151936, fp32, 1.0), PenaltyCase(1024, 32000, fp32, 1.0)]
    return [PenaltyCase(256, 151936, fp32), PenaltyCase(256, 151936, bf16), PenaltyCase(1, 151936, fp32, 1.0),
            PenaltyCase(1024, 32000, fp32, 1.0), PenaltyCase(1, 151936, bf16, 1.0), PenaltyCase(1024, 32000, bf16, 1.0),
            PenaltyCase(256, 151936, bf16, one_mask=True), PenaltyCase(256, 151936, torch.float16, 0.5),
            PenaltyCase(1024, 32000, fp32)]


def make_penalty_inputs(case: PenaltyCase, seed: int = 0, device: str = "cuda") -> tuple:
    """Positional op args (logits [rows, vocab] N(0, 1), prompt_mask, output_mask, penalties [rows] in
    [1.0, 1.2) of the logits' dtype, as vLLM passes them). Penalties near 1 keep graph replays, which apply the
    op again and again to the same logits, from driving them to 0 or inf within a run."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows, vocab = case.shape
    logits = torch.randn(rows, vocab, generator=gen, device=device).to(case.dtype)
    prompt = torch.rand(rows, vocab, generator=gen, device=device) < case.density
    output = prompt if case.one_mask else torch.rand(rows, vocab, generator=gen, device=device) < case.density
    penalties = (1.0 + 0.2 * torch.rand(rows, generator=gen, device=device)).to(case.dtype)
    return (logits, prompt, output, penalties)


def penalty_reference_into(logits, prompt_mask, output_mask, repetition_penalties) -> None:
    """The reference (float32 math) written into the logits: what the torch baseline compiles."""
    logits.copy_(OP.reference(logits, prompt_mask, output_mask, repetition_penalties)[0])


def penalty_providers(case: PenaltyCase, vllm_ops=None) -> dict[str, Callable]:
    """{name: fn(*args)} besides the torch baseline: our eager public function and vLLM's op."""
    providers: dict[str, Callable] = {"cupy_ops": cupy_ops.apply_repetition_penalties_}
    if vllm_ops is not None:
        providers["vllm"] = vllm_ops.apply_repetition_penalties_
    return providers


def penalty_gold(args: tuple) -> tuple[torch.Tensor]:
    """float64-math reference of the logits, rounded to their dtype."""
    return OP.reference(*args, compute_dtype=torch.float64)


SMALL_CASE = PenaltyCase(8, 32000, torch.bfloat16)


def penalty_eager_calls(vllm_ops=None) -> dict[str, tuple[Callable, tuple]]:
    """{name: (fn, args)} on 8 x 32000 bf16: eager public call, dispatcher call, vLLM's op call."""
    args = make_penalty_inputs(SMALL_CASE)
    calls = {"cupy_ops": (cupy_ops.apply_repetition_penalties_, args),
             "cupy_ops_dispatcher": (torch.ops.cupy_ops.apply_repetition_penalties_, args)}
    if vllm_ops is not None:
        calls["vllm"] = (vllm_ops.apply_repetition_penalties_, args)
    return calls


# Child process: first call (compile or disk-cache load, module load, first launch) of one instantiation.
_COMPILE_PROBE = first_call_probe("apply_repetition_penalties_",
                                  "from cupy_ops._bench.apply_repetition_penalties_ import SMALL_CASE, "
                                  "make_penalty_inputs\nargs = make_penalty_inputs(SMALL_CASE)")


SUITE = OpSuite(
    op="apply_repetition_penalties_", cases=penalty_cases, make_inputs=make_penalty_inputs,
    providers=penalty_providers, reference_into=penalty_reference_into, outputs=lambda args: (args[0],),
    gold=penalty_gold, output_dtypes=lambda case: (case.dtype,), eager_calls=penalty_eager_calls,
    eager_providers=("cupy_ops", "cupy_ops_dispatcher", "vllm"), compile_probe=_COMPILE_PROBE,
    small_case="8x32000 bf16, 1% masks",
)
