"""Benchmark suite of top_k_per_row_decode (shared pieces in top_k_per_row_prefill.py).

Targets (issue 9, H200, CUDA-graph replay, vs vLLM in one run): >= 2x at 4 x 163840 and 128 x 131072, k 2048
(vLLM 71 and 91 us; byte floor of the second ~16 us); no slower at 1 x 8192 (7.4 us) and 64 x 65536 k 512
(35 us); faster than torch.topk everywhere. Lengths 80-100% of the width with -inf past them, as vLLM's
bench_top_k_per_row.py.
"""

from __future__ import annotations

import torch

from cupy_ops.ops.top_k_per_row import DECODE

from .top_k_per_row_prefill import TopKCase, decode_case, row_lengths, scores, topk_suite


def cases(quick: bool = False) -> list[TopKCase]:
    # (rows, width, k, vLLM's H200 µs) of the targets, then shapes around them
    main = [decode_case(*shape) for shape in ((4, 163840, 2048, 71.4), (128, 131072, 2048, 90.8), (1, 8192, 2048, 7.4),
                                              (64, 65536, 512, 34.6))]
    if quick:
        return main[:3]
    return main + [decode_case(*shape) for shape in ((1, 163840, 2048), (32, 163840, 2048), (16, 32768, 1024),
                                                     (256, 16384, 2048))]


def make_inputs(case: TopKCase, seed: int = 0, device: str = "cuda") -> tuple:
    """(logits [rows, width], next_n = 1, seq_lens [rows], indices, rows, stride0, stride1, k)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lengths = row_lengths(case, gen, device)
    logits = scores(case, lengths, gen, device, float("-inf"))
    indices = torch.full((case.rows, case.k), -7, dtype=torch.int32, device=device)
    return (logits, 1, lengths, indices, case.rows, logits.stride(0), logits.stride(1), case.k)


SMALL_CASE = decode_case(4, 8192, 2048)

SUITE = topk_suite(DECODE, cases, make_inputs, SMALL_CASE, "4 rows x 8192, k 2048", output_index=3)
