"""Benchmark suite of top_k_per_row_prefill, and what the three top-k suites share (cases, inputs, agreement).

Targets (issue 9, H200, CUDA-graph replay, vs vLLM in one run): >= 1.5x at 4096 rows with lengths rising from
2048 to 8192, k 2048 (vLLM 90 us; byte floor ~20 us) and at 8192 rows with lengths rising to 32768 (vLLM 462 us);
faster than torch.topk everywhere. Outputs are index sets, so agreement is the output contract: every row a valid
top-k (in-window, distinct, -1 padded) whose values equal torch.topk's as a multiset (any order, any tie choice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from cupy_ops.ops.persistent_topk import max_length
from cupy_ops.ops.top_k_per_row import PREFILL, decode_ends
from cupy_ops.ops.topk_rows import float_keys

from .harness import OpSuite, eager_calls_for, first_call_probe

VLLM_WORKSPACE_BYTES = 1 << 20  # RADIX_TOPK_WORKSPACE_SIZE: what vLLM's callers pass to its persistent_topk


@dataclasses.dataclass(frozen=True)
class TopKCase:
    """`rows` x `width` fp32 scores, k; row lengths `lo`..`hi`: rising linearly over the rows (`ramp`, causal
    prefill) or uniform at random (decode batches, vLLM's benchmarks: 80-100% of the width). `vllm_us`: the
    anchor's H200 figure (shared/anchors/README.md), for the record."""

    rows: int
    width: int
    k: int
    lo: int
    hi: int
    ramp: bool = False
    vllm_us: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.width)

    @property
    def name(self) -> str:
        lengths = f"{self.lo}..{self.hi}" if self.ramp else f"{round(100 * self.lo / self.width)}-100%"
        return f"{self.rows}x{self.width}-k{self.k}-{lengths}"

    @property
    def dtype_name(self) -> str:
        return "fp32"

    @property
    def input_bytes(self) -> int:
        return 4 * self.rows * self.width + 8 * self.rows

    @property
    def bytes_moved(self) -> int:
        """The floor: each row's window read once (mean length), its k indices written, its lengths read."""
        return int(4 * self.rows * (self.lo + self.hi) / 2) + 4 * self.rows * self.k + 8 * self.rows

    def __str__(self) -> str:
        return f"{self.name}-{self.dtype_name}"


def decode_case(rows: int, width: int, k: int, vllm_us: float | None = None) -> TopKCase:
    """A decode batch as vLLM benchmarks it: row lengths uniform in 80-100% of the width."""
    return TopKCase(rows, width, k, int(0.8 * width), width, vllm_us=vllm_us)


def row_lengths(case: TopKCase, gen: torch.Generator, device: str) -> torch.Tensor:
    """int32 [rows]: the case's lengths (rising, or uniform in [lo, hi])."""
    if case.ramp:
        return torch.linspace(case.lo, case.hi, case.rows, device=device).round().to(torch.int32)
    return torch.randint(case.lo, case.hi + 1, (case.rows,), generator=gen, device=device, dtype=torch.int32)


def scores(case: TopKCase, lengths: torch.Tensor, gen: torch.Generator, device: str, tail: float) -> torch.Tensor:
    """N(0, 1) scores with `tail` (vLLM's benchmarks: -inf for decode, NaN for persistent) past each length."""
    logits = torch.randn(case.rows, case.width, generator=gen, device=device)
    past = torch.arange(case.width, device=device)[None, :] >= lengths.to(torch.int64)[:, None]
    return logits.masked_fill_(past, tail)


def windows(op: str, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, length) int64 [rows] of each row's window, as each op clamps it."""
    logits = args[0]
    width = logits.shape[1]
    if op == "top_k_per_row_prefill":
        start = args[1].to(torch.int64).clamp(0, width)
        return start, torch.maximum(args[2].to(torch.int64), start).clamp(max=width) - start
    if op == "top_k_per_row_decode":
        length = decode_ends(args[2], args[1], args[4]).clamp(0, width)
    else:
        length = args[1].reshape(-1).to(torch.int64).clamp(0, max_length(args[5], width))
    return torch.zeros_like(length), length


def valid_rows(op: str, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """bool [rows]: the row is a valid top-k of its window (in-window distinct indices then -1, values equal to
    torch.topk's as order keys: -0 == +0, NaN above +inf)."""
    logits = args[0]
    start, length = windows(op, args)
    rows, k = out.shape
    out = out.to(torch.int64)
    slot = torch.arange(k, device=out.device)[None, :]
    taken = torch.minimum(length, torch.full_like(length, k))[:, None]
    valid = slot < taken
    shaped = torch.where(valid, (out >= 0) & (out < length[:, None]), out == -1).all(dim=1)
    picked = torch.where(valid, out, torch.full_like(out, 2**40)).sort(dim=1).values
    distinct = ~(valid[:, 1:] & (picked[:, 1:] == picked[:, :-1])).any(dim=1)
    columns = (torch.where(valid, out, torch.zeros_like(out)).clamp(0, logits.shape[1] - 1) + start[:, None]).clamp(
        max=logits.shape[1] - 1)
    got = torch.where(valid, float_keys(logits.gather(1, columns)), torch.full_like(out, -1))
    cols = torch.arange(logits.shape[1], device=out.device)[None, :]
    inside = (cols >= start[:, None]) & (cols < (start + length)[:, None])
    best = torch.where(inside, logits, torch.full_like(logits, float("-inf"))).topk(min(k, logits.shape[1])).values
    want = torch.where(slot[:, :best.shape[1]] < taken, float_keys(best), torch.full_like(out[:, :best.shape[1]], -1))
    if want.shape[1] < k:
        want = torch.cat([want, want.new_full((rows, k - want.shape[1]), -1)], dim=1)
    same = (got.sort(dim=1, descending=True).values == want.sort(dim=1, descending=True).values).all(dim=1)
    return shaped & distinct & same


def agree(op: str) -> Callable:
    """The suites' `agree`: both outputs valid top-k rows (then equal up to order and ties); worst = bad rows."""
    def check(case, args, outputs, expected, loose=False) -> tuple[bool, float]:
        bad = (~valid_rows(op, args, outputs[0]) | ~valid_rows(op, args, expected[0])).sum()
        return int(bad) == 0, float(bad)
    return check


def masked_topk_into(op: str) -> Callable:
    """The torch baseline: torch.topk of each row with -inf outside its window, relative indices, -1 past L."""
    def reference_into(*args) -> None:
        logits = args[0]
        out = args[{"persistent_topk": 2}.get(op, 3)]
        start, length = windows(op, args)
        cols = torch.arange(logits.shape[1], device=logits.device)[None, :]
        inside = (cols >= start[:, None]) & (cols < (start + length)[:, None])
        k = out.shape[1]
        picked = torch.where(inside, logits, float("-inf")).topk(k, dim=1).indices
        slot = torch.arange(k, device=logits.device)[None, :]
        out.copy_(torch.where(slot < length[:, None], picked - start[:, None], -1))
    return reference_into


def compile_probe(module: str, op: str) -> str:
    """Child code: first and second call ms of the suite's small case in a fresh process."""
    return first_call_probe(op, f"from cupy_ops._bench.{module} import SMALL_CASE, make_inputs\n"
                                "args = make_inputs(SMALL_CASE, 0)")


def topk_suite(op, cases: Callable, make_inputs: Callable, small_case: TopKCase, small_label: str,
               output_index: int, vllm_call: Callable | None = None) -> OpSuite:
    """The OpSuite of one of the three top-k ops (`op`: its Op; its suite module is named after it): ours and
    vLLM's op (`vllm_call(vllm_ops)`, default `vllm_ops.<op>`), torch.topk as the baseline, the output contract as
    agreement; `output_index`: the argument the op writes."""
    name = op.name
    vllm_call = vllm_call or (lambda vllm_ops: getattr(vllm_ops, name))

    def providers(case: TopKCase, vllm_ops=None) -> dict[str, Callable]:
        found: dict[str, Callable] = {"cupy_ops": op.public}
        if vllm_ops is not None:
            found["vllm"] = vllm_call(vllm_ops)
        return found

    return OpSuite(
        op=name, cases=cases, make_inputs=make_inputs, providers=providers,
        reference_into=masked_topk_into(name), outputs=lambda args: (args[output_index],),
        gold=lambda args: op.reference(*args), output_dtypes=lambda case: (torch.int32,),
        eager_calls=lambda vllm_ops: eager_calls_for(op, make_inputs(small_case, 0),
                                                     vllm_call(vllm_ops) if vllm_ops else None),
        eager_providers=("cupy_ops", "cupy_ops_dispatcher", "vllm"), compile_probe=compile_probe(name, name),
        small_case=small_label, agree=agree(name))


# ---- top_k_per_row_prefill -------------------------------------------------------------------------------------


def cases(quick: bool = False) -> list[TopKCase]:
    """Causal prefill: row r's window is [0, L_r) with L rising over the rows (vLLM's indexer layout)."""
    main = [TopKCase(4096, 8192, 2048, 2048, 8192, ramp=True, vllm_us=89.6),
            TopKCase(8192, 32768, 2048, 4, 32768, ramp=True, vllm_us=462.1)]
    if quick:
        return main
    return main + [TopKCase(2048, 16384, 512, 1024, 16384, ramp=True), TopKCase(64, 65536, 2048, 2049, 65536,
                                                                                ramp=True)]


def make_inputs(case: TopKCase, seed: int = 0, device: str = "cuda") -> tuple:
    """(logits [rows, width], rowStarts = 0, rowEnds = lengths, indices, rows, stride0, stride1, k); scores past
    each window are -inf (clean_logits=False callers leave garbage there: it is never read)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lengths = row_lengths(case, gen, device)
    logits = scores(case, lengths, gen, device, float("-inf"))
    starts = torch.zeros(case.rows, dtype=torch.int32, device=device)
    indices = torch.full((case.rows, case.k), -7, dtype=torch.int32, device=device)
    return (logits, starts, lengths, indices, case.rows, logits.stride(0), logits.stride(1), case.k)


# The eager host cost's case: tiny, as decode's and persistent's, so 500 calls queue faster than the GPU runs them
# (64 rows up to 8192 wide took longer on the GPU than the host's call: that loop measured the GPU).
SMALL_CASE = TopKCase(4, 8192, 2048, 1024, 8192, ramp=True)

SUITE = topk_suite(PREFILL, cases, make_inputs, SMALL_CASE, "4 rows x 8192, k 2048, lengths 1024..8192",
                   output_index=3)
