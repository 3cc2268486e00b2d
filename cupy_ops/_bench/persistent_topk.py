"""Benchmark suite of persistent_topk (shared pieces in top_k_per_row_prefill.py).

Targets (issue 10, H200, CUDA-graph replay, vs vLLM in one run): >= 2x at 1 and 4 rows x 163840 (k 2048; vLLM
22.5 and 21.7 us) and at 4 x 65536 (k 1024; 21.6 us); >= 1.2x at 32 x 163840 and 128 x 131072 (k 2048; 51.6 and
30.6 us) and 256 x 32768 (k 512; 23.2 us); never slower than vLLM. Lengths 80-100% of the width with NaN past
them and max_seq_len = width, as vLLM's benchmark_persistent_topk.py; vLLM gets its usual 1 MiB workspace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cupy_ops.ops.persistent_topk import OP, persistent_topk_workspace

from .top_k_per_row_prefill import VLLM_WORKSPACE_BYTES, TopKCase, decode_case, row_lengths, scores, topk_suite


def cases(quick: bool = False) -> list[TopKCase]:
    # (rows, width, k, vLLM's H200 µs) of the targets, then shapes around them
    main = [decode_case(*shape) for shape in ((1, 163840, 2048, 22.5), (4, 163840, 2048, 21.7), (4, 65536, 1024, 21.6),
                                              (32, 163840, 2048, 51.6), (128, 131072, 2048, 30.6),
                                              (256, 32768, 512, 23.2))]
    if quick:
        return main[1:2] + main[4:]
    return main + [decode_case(*shape) for shape in ((8, 4096, 2048), (64, 20000, 512), (1024, 8192, 2048),
                                                     (8, 262144, 2048))]


def make_inputs(case: TopKCase, seed: int = 0, device: str = "cuda") -> tuple:
    """(logits [rows, width], lengths [rows], output, workspace (ours: empty), k, max_seq_len = width)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    lengths = row_lengths(case, gen, device)
    logits = scores(case, lengths, gen, device, float("nan"))
    output = torch.full((case.rows, case.k), -7, dtype=torch.int32, device=device)
    workspace = persistent_topk_workspace(case.rows, case.width, case.k, device)
    return (logits, lengths, output, workspace, case.k, case.width)


def _vllm_call(vllm_ops) -> Callable:
    """vLLM's op with the 1 MiB workspace its callers reserve (ours needs none)."""
    workspace = torch.empty(VLLM_WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")

    def call(logits, lengths, output, _workspace, k, max_seq_len):
        vllm_ops.persistent_topk(logits, lengths, output, workspace, k, max_seq_len)
    return call


SMALL_CASE = decode_case(4, 8192, 2048)

SUITE = topk_suite(OP, cases, make_inputs, SMALL_CASE, "4 rows x 8192, k 2048", output_index=2,
                   vllm_call=_vllm_call)
